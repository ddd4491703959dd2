"""Index files: which blobs are in which packs, in columns.

The repository's index is the union of its ``index/<64 hex>`` files. Each is written
after the packs it names, is content-addressed (its name is the id of its bytes) and is
never changed; :mod:`.gc` and ``vmbackup index compact`` replace files by new ones.
Two forms exist, both sealed as metadata (:meth:`.keys.Keys.seal_data`):

* **binary** (kind ``AGVBIDXB``; repositories of format 3), entries sorted by blob id::

      u32 packs ‖ u64 entries ‖ pack digest × packs (32 bytes each)
                ‖ blob id × entries (32 bytes each) ‖ value × entries (16 bytes each)
      value = u32 pack (a number into the digests) ‖ u32 offset ‖ u32 length
              ‖ u32 raw length | kind << 31          (little-endian; kind 0 data, 1 tree)

  48 bytes an entry and a numpy array without parsing – a million entries read in
  milliseconds where the JSON form took seconds (the cost that made every command of a
  large repository slow: issue 14, ``docs/repository.md``);
* **JSON** (kind ``AGVBINDX``; what repositories of format 1 and 2 hold and are still
  written): ``{"packs": {pack name: [[blob id, kind, offset, length, raw length], …]}}``.

Both read into :class:`Entries`, the columnar form the local index cache
(:mod:`.indexcache`) is built from.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .keys import CorruptError
from .packs import BlobLocation, parse_entry

__all__ = [
    "BINARY_KIND",
    "FILE_ENTRIES",
    "JSON_KIND",
    "KINDS",
    "VALUE",
    "Entries",
    "decode_binary",
    "decode_json",
    "encode_binary",
    "location_of",
    "pack_digest",
    "pack_name",
]

JSON_KIND = b"AGVBINDX"
BINARY_KIND = b"AGVBIDXB"
KINDS = ("data", "tree")  # a blob's kind, as the value's top bit
FILE_ENTRIES = 1 << 20  # entries a binary index file holds at most (48 MiB: read whole)
VALUE = np.dtype([("pack", "<u4"), ("offset", "<u4"), ("length", "<u4"), ("raw", "<u4")])
_HEAD = struct.Struct("<IQ")
_KIND_BIT = np.uint32(1 << 31)
_RAW_MASK = np.uint32((1 << 31) - 1)
_PACK_NAME = re.compile(r"data/([0-9a-f]{2})/([0-9a-f]{64})")
_EMPTY_IDS = np.zeros(0, "S32")


def pack_digest(name: str) -> bytes:
    """The 32-byte digest a pack's name ``data/<2 hex>/<64 hex>`` carries; ValueError if
    *name* is not a pack's name."""
    match = _PACK_NAME.fullmatch(name)
    if match is None or not match[2].startswith(match[1]):
        raise ValueError(f"{name!r:.90}: not a pack's name")
    return bytes.fromhex(match[2])


def pack_name(digest: bytes) -> str:
    text = digest.hex()
    return f"data/{text[:2]}/{text}"


@dataclasses.dataclass
class Entries:
    """Index entries in columns: blob *ids* (``S32``, numpy compares them as memcmp
    does), their *values* (:data:`VALUE`) and the *packs* the values number (``S32``
    digests). Any order unless :meth:`sorted`; a blob may appear more than once (in
    several packs)."""

    ids: np.ndarray
    values: np.ndarray
    packs: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls) -> Entries:
        return cls(_EMPTY_IDS, np.zeros(0, VALUE), _EMPTY_IDS)

    @classmethod
    def of(cls, pairs: Iterable[tuple[bytes, BlobLocation]]) -> Entries:
        """The entries of (blob id, where) *pairs*; ValueError if one does not fit (not a
        pack's name, a kind this format has no bit for, sizes of 4 GiB or more)."""
        located = list(pairs)
        numbers: dict[str, int] = {}
        ids = np.empty(len(located), "S32")
        values = np.empty(len(located), VALUE)
        for row, (blob, where) in enumerate(located):
            pack = numbers.setdefault(where.pack, len(numbers))
            if len(blob) != 32 or where.kind not in KINDS:
                raise ValueError(f"entry {blob.hex()[:16]}: not a blob id and kind")
            if not (
                0 <= where.offset < 1 << 32 and 0 < where.length < 1 << 32 and 0 <= where.raw_length < 1 << 31
            ):
                raise ValueError(f"entry {blob.hex()[:16]}: sizes beyond what an index entry holds")
            ids[row] = blob
            values[row] = (pack, where.offset, where.length, where.raw_length | KINDS.index(where.kind) << 31)
        packs = np.array([pack_digest(name) for name in numbers], "S32") if numbers else _EMPTY_IDS
        return cls(ids, values, packs)

    def sorted(self) -> Entries:
        order = np.argsort(self.ids, kind="stable")
        return Entries(self.ids[order], self.values[order], self.packs)

    def location(self, row: int) -> BlobLocation:
        return location_of(self.packs, self.values[row])

    def items(self) -> Iterator[tuple[bytes, BlobLocation]]:
        for row in range(len(self)):
            yield _id(self.ids, row), self.location(row)

    def locations(self) -> dict[bytes, BlobLocation]:
        """blob id -> where (a blob in several packs: the last entry)."""
        return dict(self.items())


def location_of(packs: np.ndarray, value: Any) -> BlobLocation:
    """The location a *value* (:data:`VALUE`) gives, its pack number looked up in *packs*."""
    return located(pack_name(_id(packs, int(value["pack"]))), value["offset"], value["length"], value["raw"])


def located(pack: str, offset: Any, length: Any, raw: Any) -> BlobLocation:
    """The location of a value's fields in *pack*: *raw* is the raw length | kind << 31."""
    kind_and_length = int(raw)
    return BlobLocation(
        pack, int(offset), int(length), KINDS[kind_and_length >> 31], kind_and_length & int(_RAW_MASK)
    )


def _id(column: np.ndarray, row: int) -> bytes:
    """Item *row* of an ``S32`` column as its 32 bytes (numpy's item drops trailing NULs)."""
    return column[row : row + 1].tobytes()


def encode_binary(entries: Entries) -> bytes:
    """The payload of a binary index file of *entries* (sorted here)."""
    entries = entries.sorted()
    return b"".join(
        [
            _HEAD.pack(len(entries.packs), len(entries)),
            entries.packs.tobytes(),
            entries.ids.tobytes(),
            entries.values.astype(VALUE, copy=False).tobytes(),
        ]
    )


def decode_binary(payload: bytes, where: str) -> Entries:
    """The entries of a binary index file's payload; CorruptError naming *where* if it
    is not one (sizes that do not add up, a value naming no pack, an empty blob)."""
    if len(payload) < _HEAD.size:
        raise CorruptError(f"{where}: malformed index", where)
    packs, count = _HEAD.unpack_from(payload)
    if len(payload) != _HEAD.size + 32 * packs + 48 * count or count > FILE_ENTRIES << 4:
        raise CorruptError(f"{where}: malformed index (its sizes do not add up)", where)
    at = _HEAD.size
    digests = np.frombuffer(payload, "S32", packs, at)
    ids = np.frombuffer(payload, "S32", count, at + 32 * packs)
    values = np.frombuffer(payload, VALUE, count, at + 32 * packs + 32 * count)
    if count and (int(values["pack"].max()) >= packs or not values["length"].all()):
        raise CorruptError(f"{where}: malformed index (an entry names no pack, or no bytes)", where)
    return Entries(ids, values, digests)


def decode_json(document: Any, where: str) -> Entries:
    """The entries of a JSON index file's document; CorruptError naming *where* if it is
    malformed (:func:`.packs.parse_entry` says what an entry must be)."""
    try:
        located = [
            parse_entry(pack, entry)
            for pack, entries in document["packs"].items()
            if isinstance(pack, str)
            for entry in entries
        ]
        return Entries.of(located)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CorruptError(f"{where}: malformed index", where) from None
