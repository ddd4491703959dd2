"""Pack files: many sealed blobs in one storage object, as restic packs them.

A 64 KiB chunk per object would mean tens of thousands of objects per GiB – slow on a
file system and costly on S3 – so blobs are appended to packs of about 16 MiB::

    "AGVBPACK" 0x01 ‖ salt ‖ blob ‖ blob ‖ ... ‖ trailer ‖ u32 trailer length ‖ "AGVBPEND"
    trailer = sealed JSON [[blob id, kind, offset, length, raw length], ...]
    salt    = 16 random bytes, so that no two packs are ever the same object

A pack is named by the repository's hash of its bytes (``data/<2 hex>/<64 hex>``; BLAKE3,
or SHA-256 in older repositories), so a whole pack can be checked against its name, and
it describes itself: the index of the repository can be rebuilt from the trailers alone.
Blob kinds: ``data`` (a chunk of a disk) and ``tree`` (a page of a disk's chunk index).

The salt matters when the repository is not encrypted (nothing else in a pack is
random): without it, a backup storing anew the blobs of a pack that a garbage collection
condemned could write that very pack again, byte for byte and under its name, just as
the collection deletes it.
"""

from __future__ import annotations

import dataclasses
import os
import struct

from .keys import CorruptError, Keys

__all__ = ["PACK_MAGIC", "BlobLocation", "PackBuilder", "pack_name", "parse_entry", "read_trailer"]

PACK_MAGIC = b"AGVBPACK"
PACK_END = b"AGVBPEND"
TRAILER_KIND = b"AGVBPTRL"
_HEAD = PACK_MAGIC + b"\x01"
_SALT = 16  # packs before the salt existed have none: readers need not know
_TAIL = struct.Struct("<I8s")  # trailer length, PACK_END
TARGET_SIZE = 16 << 20


@dataclasses.dataclass(frozen=True)
class BlobLocation:
    """Where a blob is: its pack, the byte range of its sealed form, its kind and size."""

    pack: str
    offset: int
    length: int
    kind: str
    raw_length: int

    def entry(self, blob_id: bytes) -> list[object]:
        return [blob_id.hex(), self.kind, self.offset, self.length, self.raw_length]


def parse_entry(pack: str, entry: object) -> tuple[bytes, BlobLocation]:
    """One stored entry ``[blob id (hex), kind, offset, length, raw length]`` of a pack
    trailer or an index file, as (blob id, where); ValueError or TypeError if it is not
    one. The readers call this, not ``int()``, on what they read: an entry that passes
    its tag or checksum can still be malformed (whoever may write an unencrypted
    repository can seal one; the fault campaign's fuzzing made ``1e999``, negative
    lengths and ids of 63 digits, which escaped as OverflowError or reached the storage)."""
    if not isinstance(entry, list) or len(entry) != 5:
        raise ValueError(f"entry {entry!r:.80}: not a list of five fields")
    blob, kind, offset, length, raw = entry
    numbers = (offset, length, raw)
    if not isinstance(blob, str) or len(blob) != 64 or not isinstance(kind, str):
        raise ValueError(f"entry {entry!r:.80}: not a blob id and kind")
    if not all(type(n) is int and 0 <= n < 1 << 63 for n in numbers) or not length:
        raise ValueError(f"entry {entry!r:.80}: offset and lengths are not sizes")
    return bytes.fromhex(blob), BlobLocation(pack, offset, length, kind, raw)


def pack_name(keys: Keys, data: bytes) -> str:
    digest = keys.digest(data).hex()
    return f"data/{digest[:2]}/{digest}"


class PackBuilder:
    """Collects sealed blobs until the pack is big enough; not thread-safe."""

    def __init__(self, keys: Keys, target_size: int = TARGET_SIZE):
        self.keys = keys
        self.target_size = target_size
        self._parts: list[bytes] = [_HEAD, os.urandom(_SALT)]
        self._size = len(_HEAD) + _SALT
        self._entries: list[tuple[bytes, str, int, int, int]] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        return self._size >= self.target_size

    def add(self, blob_id: bytes, kind: str, sealed: bytes, raw_length: int) -> None:
        self._entries.append((blob_id, kind, self._size, len(sealed), raw_length))
        self._parts.append(sealed)
        self._size += len(sealed)

    def finish(self) -> tuple[str, bytes, dict[bytes, BlobLocation]]:
        """(name, bytes, where each blob is) of the finished pack."""
        entries = [[b.hex(), kind, off, length, raw] for b, kind, off, length, raw in self._entries]
        trailer = self.keys.seal_meta(TRAILER_KIND, entries, "")  # the pack's name is the hash of it all
        data = b"".join([*self._parts, trailer, _TAIL.pack(len(trailer), PACK_END)])
        name = pack_name(self.keys, data)
        locations = {
            blob: BlobLocation(name, offset, length, kind, raw)
            for blob, kind, offset, length, raw in self._entries
        }
        return name, data, locations


def read_trailer(keys: Keys, name: str, data: bytes) -> dict[bytes, BlobLocation]:
    """The blobs a whole pack says it holds; CorruptError if the pack is not sound (its
    name is not the hash of its bytes, its framing or trailer does not check)."""
    if pack_name(keys, data) != name:
        raise CorruptError(f"{name}: content does not match its name", name)
    if not data.startswith(_HEAD) or len(data) < len(_HEAD) + _TAIL.size:
        raise CorruptError(f"{name}: not a pack", name)
    length, end = _TAIL.unpack_from(data, len(data) - _TAIL.size)
    if end != PACK_END or length > len(data) - len(_HEAD) - _TAIL.size:
        raise CorruptError(f"{name}: bad pack trailer", name)
    trailer = data[len(data) - _TAIL.size - length : len(data) - _TAIL.size]
    entries = keys.open_meta(TRAILER_KIND, trailer, "", where=name)
    try:
        return dict(parse_entry(name, entry) for entry in entries)
    except (TypeError, ValueError):
        raise CorruptError(f"{name}: malformed pack trailer", name) from None
