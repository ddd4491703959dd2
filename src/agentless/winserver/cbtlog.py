"""The bytes of changed block tracking: the bitmap, the CBT log file, and the CBT errors.

:mod:`agentless.winserver.cbt` owns the semantics (generations, invalidation) and is the
public face (it re-exports everything a caller needs from here); this module owns the bytes,
and the error tree, being the lowest layer that raises them.

The bitmap: bit *i* is 64 KiB block *i* (bytes ``[i * 65536, (i + 1) * 65536)``), most
significant bit of each byte first, as XenServer's ``VDI.list_changed_blocks`` and the VHD
sector bitmaps; ``ceil(blocks / 8)`` bytes, padding bits past the last block zero. On the
wire it travels as base64 (:func:`to_base64`); readers want merged byte ranges clipped to
the disk size (:func:`changed_ranges`)::

    size = 200000 bytes -> 4 blocks, 1 byte      bits  1 1 0 1 0 0 0 0   (0xD0)
    changed_ranges  ->  [0, 131072)  [196608, 200000)     the last block is partial

The file: one ``<vdi-uuid>.cbt`` per VDI. Layout, all integers big-endian::

    offset  size  field
         0     8  magic          b"AGCBTLOG"
         8     2  version        1
        10     2  flags          bit 0 FLAG_IN_USE: a tracker has the file open
        12     4  block_size     65536 (CBT_BLOCK); anything else is refused
        16     8  disk_size      virtual disk size in bytes, fixed at enable time
        24    16  vdi_uuid       the VDI's UUID, 16 raw bytes
        40     8  opened_ns      when the last tracker opened the file (Unix ns, 0 = never)
        48     4  opened_pid     the process that opened it
        52     4  record_count
        56     8  body_length    bytes of records that follow the header
        64     .  records        record_count records, back to back
       end-32 32  checksum       BLAKE2b-256 of every byte before it

    record:  kind u8 │ reserved u8 (0) │ id_length u16 │ reason_length u16 │ payload_length u32
             │ id (UTF-8) │ reason (UTF-8) │ payload

    kind  REC_GENERATION  id = snapshot id, payload = bitmap; oldest first
          REC_LIVE        exactly one, id and reason empty or reason = why CBT is invalid,
                          payload = blocks changed since the last snapshot
          REC_LOST        id = a snapshot whose history was lost, reason = why; no payload

A bitmap payload is the zlib stream of the packed bitmap. Dirty bitmaps are sparse or
clustered, so zlib shrinks them by orders of magnitude: the whole file is rewritten at each
snapshot without cost, and generations stay compressed in memory too.

Every rewrite is atomic: the new file goes to ``<path>.tmp``, is fsynced, renamed over the old
one, and the directory is fsynced. A reader therefore sees the old or the new file, whole;
anything else (a flipped byte, a truncation, another program's file) fails :func:`decode`
with a :class:`CbtCorruptError` naming the field, which the tracker reports as invalid CBT.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import struct
import uuid
import zlib

import numpy as np
import numpy.typing as npt

from agentless.vhd.extents import Extent, IntArray, as_extents, runs, union

__all__ = [
    "BLOCK_SHIFT",
    "CBT_BLOCK",
    "FLAG_IN_USE",
    "MAGIC",
    "VERSION",
    "CbtClosedError",
    "CbtCorruptError",
    "CbtError",
    "CbtInvalidError",
    "CbtLog",
    "CbtMismatchError",
    "CbtNotEnabledError",
    "CbtSnapshotExistsError",
    "CbtUnknownSnapshotError",
    "CbtValueError",
    "Generation",
    "bitmap_bytes",
    "blocks_for",
    "changed_extents",
    "changed_ranges",
    "decode",
    "encode",
    "from_base64",
    "pack_bitmap",
    "read",
    "to_base64",
    "unpack_bitmap",
    "write",
]

CBT_BLOCK = 65536
BLOCK_SHIFT = 16  # CBT_BLOCK == 1 << BLOCK_SHIFT
MAGIC = b"AGCBTLOG"
VERSION = 1
FLAG_IN_USE = 0x0001
_KNOWN_FLAGS = FLAG_IN_USE

REC_GENERATION = 1
REC_LIVE = 2
REC_LOST = 3

# magic, version, flags, block_size, disk_size, vdi_uuid, opened_ns, opened_pid,
# record_count, body_length
_HEADER = struct.Struct(">8sHHIQ16sQIIQ")
# kind, reserved, id_length, reason_length, payload_length
_RECORD = struct.Struct(">BBHHI")
CHECKSUM_SIZE = 32
_MAX_TEXT = 0xFFFF


def blocks_for(size: int) -> int:
    """Number of 64 KiB blocks that cover *size* bytes (the last one may be partial)."""
    return -(-size // CBT_BLOCK)


def bitmap_bytes(size: int) -> int:
    """Length in bytes of the packed bitmap of a disk of *size* bytes."""
    return -(-blocks_for(size) // 8)


# ---------------------------------------------------------------------------- errors


class CbtError(Exception):
    """Base of every error of changed block tracking.

    ::

        CbtError
         ├── CbtNotEnabledError       no CBT file: enable CBT, take a full backup
         ├── CbtInvalidError          tracking was lost (``reason``): take a full backup
         ├── CbtUnknownSnapshotError  id not in the history: take a full backup
         ├── CbtSnapshotExistsError   id already names an older generation
         ├── CbtMismatchError         the file belongs to another VDI or disk size
         ├── CbtClosedError           the tracker was closed
         ├── CbtValueError            a bad argument (also a ValueError); nothing changed
         └── CbtCorruptError          a CBT file is unsound (from read(); the tracker
                                      reports it as invalid CBT instead)

    None of them leaves the file half-written; every one that a backup can meet says
    "fall back to a full backup", so callers may treat the base class that way.
    """


class CbtNotEnabledError(CbtError):
    """No CBT file at ``path``: CBT was never enabled for the VDI, or was disabled."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(f"{path}: CBT is not enabled for this VDI")


class CbtInvalidError(CbtError):
    """Changes cannot be listed: ``reason`` says why (unclean stop, corrupt file). The
    caller must take a full backup; after the next snapshot, CBT is valid again."""

    def __init__(self, reason: str, snapshot_id: str | None = None):
        self.reason = reason
        self.snapshot_id = snapshot_id
        about = f" (snapshot {snapshot_id!r})" if snapshot_id is not None else ""
        super().__init__(f"CBT is invalid{about}: {reason}")


class CbtUnknownSnapshotError(CbtError):
    """``snapshot_id`` is not in this VDI's history: never taken while CBT was enabled,
    forgotten, or lost with a corrupt file. The caller should take a full backup."""

    def __init__(self, snapshot_id: str):
        self.snapshot_id = snapshot_id
        super().__init__(f"snapshot {snapshot_id!r} is unknown to CBT")


class CbtSnapshotExistsError(CbtError):
    """``snapshot_id`` already names a generation other than the newest; ids are unique."""

    def __init__(self, snapshot_id: str):
        self.snapshot_id = snapshot_id
        super().__init__(f"snapshot {snapshot_id!r} already exists in the CBT history")


class CbtMismatchError(CbtError):
    """The file at ``path`` records another ``field`` (``vdi_uuid`` or ``size``) than the
    caller gave. The file is untouched; if the disk changed, disable and re-enable CBT."""

    def __init__(self, path: str, field: str, expected: object, found: object):
        self.path, self.field, self.expected, self.found = path, field, expected, found
        super().__init__(f"{path}: CBT file has {field} {found}, expected {expected}")


class CbtClosedError(CbtError):
    """The tracker was closed; open it again."""


class CbtValueError(CbtError, ValueError):
    """An argument is wrong (a range outside the disk, a bitmap of the wrong length, an
    empty snapshot id): a bug in the caller. Nothing was changed."""


class CbtCorruptError(CbtError):
    """The bytes are not a sound CBT log: ``path``, ``field`` at fault, ``offset`` in the
    file (or ``None``) and ``reason``. Nothing in the file can be trusted, so nothing of it
    is used; the tracker turns this into invalid CBT and rewrites the file."""

    def __init__(self, path: str, field: str, offset: int | None, reason: str):
        self.path = path
        self.field = field
        self.offset = offset
        self.reason = reason
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{path}: {field}{where}: {reason}")


# ---------------------------------------------------------------------------- bitmaps


def _check_bitmap(bitmap: bytes | bytearray | memoryview, size: int) -> None:
    if size <= 0:
        raise CbtValueError(f"disk size must be positive, not {size}")
    if len(bitmap) != bitmap_bytes(size):
        raise CbtValueError(f"bitmap of {len(bitmap)} bytes, a disk of {size} needs {bitmap_bytes(size)}")


def to_base64(bitmap: bytes | bytearray | memoryview) -> str:
    """The bitmap as ``VDI.list_changed_blocks`` returns it (standard base64, padded)."""
    return base64.b64encode(bitmap).decode("ascii")


def from_base64(text: str, size: int) -> bytes:
    """Decode a ``list_changed_blocks`` answer for a disk of *size* bytes, checking it."""
    try:
        bitmap = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CbtValueError("not a base64 bitmap") from None
    _check_bitmap(bitmap, size)
    return bitmap


_WINDOW = 1 << 20  # blocks unpacked at once: 128 KiB of bitmap, 1 MiB of booleans (64 GiB of disk)


def changed_ranges(bitmap: bytes | bytearray | memoryview, size: int) -> tuple[IntArray, IntArray]:
    """Byte ranges (starts, ends) of the set bits, merged (adjacent blocks make one range)
    and clipped to *size*: the last block of a disk of 100000 bytes ends at 100000.

    The bitmap is unpacked a window of :data:`_WINDOW` blocks at a time, windows without
    a set bit skipped, and the runs found merged across windows: unpacked whole, a
    2040 GiB disk's bitmap (33 million blocks) took ~100 MiB for a moment per call – per
    disk of every incremental backup."""
    _check_bitmap(bitmap, size)
    packed = np.frombuffer(bitmap, dtype=np.uint8)
    count = blocks_for(size)
    found: list[tuple[IntArray, IntArray]] = []
    step = _WINDOW // 8
    for first in range(0, packed.size, step):
        window = packed[first : first + step]
        if not window.any():
            continue
        bits = np.unpackbits(window, count=min(_WINDOW, count - first * 8), bitorder="big").view(np.bool_)
        starts, ends = runs(bits)
        found.append((starts + first * 8, ends + first * 8))
    starts, ends = union(*found)  # a run across a window's edge is one range again
    return starts << BLOCK_SHIFT, np.minimum(ends << BLOCK_SHIFT, size)


def changed_extents(bitmap: bytes | bytearray | memoryview, size: int) -> list[Extent]:
    """:func:`changed_ranges` as ``(offset, length)`` extents."""
    return as_extents(*changed_ranges(bitmap, size))


# ---------------------------------------------------------------------------- the file


@dataclasses.dataclass(frozen=True)
class Generation:
    """The blocks changed between the previous snapshot and snapshot ``snapshot_id``;
    ``bitmap`` is the zlib-compressed packed bitmap (see :func:`pack_bitmap`)."""

    snapshot_id: str
    bitmap: bytes


@dataclasses.dataclass
class CbtLog:
    """Everything a CBT file holds, decoded and validated.

    ``live`` is the compressed bitmap of blocks changed since the last snapshot; it is only
    meaningful when the file is not ``in_use`` (written by a clean close). ``invalid_reason``
    is empty while CBT is valid. ``lost`` maps snapshot ids whose history was discarded by
    an invalidation to the reason.
    """

    vdi_uuid: uuid.UUID
    size: int
    in_use: bool = False
    opened_ns: int = 0
    opened_pid: int = 0
    generations: list[Generation] = dataclasses.field(default_factory=list)
    live: bytes = b""
    invalid_reason: str = ""
    lost: dict[str, str] = dataclasses.field(default_factory=dict)


def pack_bitmap(bitmap: bytes | bytearray | memoryview | npt.NDArray[np.uint8]) -> bytes:
    """Compress a packed bitmap for storage (zlib level 1: fast, and enough for bitmaps)."""
    return zlib.compress(bitmap.data if isinstance(bitmap, np.ndarray) else bitmap, 1)


def unpack_bitmap(blob: bytes, size: int, path: str = "<memory>", field: str = "bitmap") -> bytes:
    """Decompress a stored bitmap of a disk of *size* bytes and validate it.

    Raises :class:`CbtCorruptError` when the stream is damaged, decompresses to another length
    than ``bitmap_bytes(size)`` (output is capped, so a hostile stream cannot balloon) or
    sets padding bits past the last block.
    """
    expected = bitmap_bytes(size)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(blob, expected + 1)
    except zlib.error as error:
        raise CbtCorruptError(path, field, None, f"damaged zlib stream: {error}") from None
    if len(raw) != expected or not inflater.eof or inflater.unused_data:
        raise CbtCorruptError(path, field, None, f"bitmap is not {expected} bytes")
    spare = expected * 8 - blocks_for(size)
    if spare and raw[-1] & ((1 << spare) - 1):
        raise CbtCorruptError(path, field, None, "bits set past the last block of the disk")
    return raw


def _text(value: str, what: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > _MAX_TEXT:
        raise CbtValueError(f"{what} of {len(data)} bytes is longer than {_MAX_TEXT}")
    return data


def encode(log: CbtLog) -> bytes:
    """The file bytes of *log*: header, records, checksum."""
    records: list[bytes] = []

    def add(kind: int, ident: str, reason: str, payload: bytes) -> None:
        ident_raw, reason_raw = _text(ident, "snapshot id"), _text(reason, "reason")
        records.append(_RECORD.pack(kind, 0, len(ident_raw), len(reason_raw), len(payload)))
        records.extend((ident_raw, reason_raw, payload))

    for generation in log.generations:
        add(REC_GENERATION, generation.snapshot_id, "", generation.bitmap)
    add(REC_LIVE, "", log.invalid_reason, log.live)
    for ident, reason in log.lost.items():
        add(REC_LOST, ident, reason, b"")
    body = b"".join(records)
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        FLAG_IN_USE if log.in_use else 0,
        CBT_BLOCK,
        log.size,
        log.vdi_uuid.bytes,
        log.opened_ns,
        log.opened_pid,
        len(log.generations) + 1 + len(log.lost),
        len(body),
    )
    digest = hashlib.blake2b(header + body, digest_size=CHECKSUM_SIZE).digest()
    return header + body + digest


def decode(raw: bytes, path: str) -> CbtLog:
    """Validate and decode the bytes of a CBT file; :class:`CbtCorruptError` on any flaw.

    Checks, in this order: length, magic, version, checksum, header fields, then every
    record (kinds, lengths, UTF-8, unique ids, exactly one live record, bitmap lengths and
    padding). Nothing is returned unless all of them pass.
    """
    if len(raw) < _HEADER.size + CHECKSUM_SIZE:
        raise CbtCorruptError(path, "header", 0, f"truncated: file of {len(raw)} bytes")
    magic, version, flags, block_size, size, vdi, opened_ns, pid, count, body_length = _HEADER.unpack_from(
        raw
    )
    if magic != MAGIC:
        raise CbtCorruptError(path, "magic", 0, f"not a CBT file (magic {magic!r})")
    if version != VERSION:
        raise CbtCorruptError(path, "version", 8, f"unsupported version {version} (this is {VERSION})")
    if len(raw) != _HEADER.size + body_length + CHECKSUM_SIZE:
        raise CbtCorruptError(
            path, "body_length", 56, f"truncated or extended: {len(raw)} bytes, header says {body_length}"
        )
    end = len(raw) - CHECKSUM_SIZE
    digest = hashlib.blake2b(raw[:end], digest_size=CHECKSUM_SIZE).digest()
    if digest != raw[end:]:
        raise CbtCorruptError(path, "checksum", end, "checksum mismatch (the file is corrupt)")
    if flags & ~_KNOWN_FLAGS:
        raise CbtCorruptError(path, "flags", 10, f"unknown flags {flags:#06x}")
    if block_size != CBT_BLOCK:
        raise CbtCorruptError(path, "block_size", 12, f"block size {block_size}, expected {CBT_BLOCK}")
    if size <= 0:
        raise CbtCorruptError(path, "disk_size", 16, "disk size is zero")
    log = CbtLog(uuid.UUID(bytes=vdi), size, bool(flags & FLAG_IN_USE), opened_ns, pid)
    seen: set[str] = set()
    live = 0
    at = _HEADER.size
    for index in range(count):
        field = f"record[{index}]"
        if at + _RECORD.size > end:
            raise CbtCorruptError(path, field, at, "runs past the end of the records")
        kind, reserved, id_length, reason_length, payload_length = _RECORD.unpack_from(raw, at)
        start = at + _RECORD.size
        stop = start + id_length + reason_length + payload_length
        if reserved or kind not in (REC_GENERATION, REC_LIVE, REC_LOST) or stop > end:
            raise CbtCorruptError(path, field, at, f"bad record header (kind {kind}, ends at {stop})")
        try:
            ident = raw[start : start + id_length].decode("utf-8")
            reason = raw[start + id_length : start + id_length + reason_length].decode("utf-8")
        except UnicodeDecodeError:
            raise CbtCorruptError(path, field, start, "id or reason is not UTF-8") from None
        payload = raw[start + id_length + reason_length : stop]
        if (kind == REC_LIVE) == bool(ident) or (kind == REC_LOST) == bool(payload):
            raise CbtCorruptError(path, field, at, f"record of kind {kind} with a wrong id or payload")
        if ident in seen:
            raise CbtCorruptError(path, field, start, f"snapshot id {ident!r} appears twice")
        seen.add(ident)
        if kind != REC_LOST:
            unpack_bitmap(payload, size, path, field)
        if kind == REC_GENERATION:
            if live or log.lost:
                raise CbtCorruptError(path, field, at, "generation after the live record")
            log.generations.append(Generation(ident, payload))
        elif kind == REC_LIVE:
            live += 1
            log.live, log.invalid_reason = payload, reason
        else:
            log.lost[ident] = reason
        at = stop
    if at != end:
        raise CbtCorruptError(path, "records", at, f"{end - at} bytes after the last record")
    if live != 1:
        raise CbtCorruptError(path, "records", None, f"{live} live records, expected one")
    return log


def read(path: str) -> CbtLog:
    """Read and decode *path*. ``FileNotFoundError`` (and other ``OSError``) as the system
    reports them; :class:`CbtCorruptError` when the content is unsound."""
    with open(path, "rb") as file:
        raw = file.read()
    return decode(raw, path)


def write(path: str, log: CbtLog) -> None:
    """Replace *path* with *log* atomically and durably (temporary file, fsync, rename,
    fsync of the directory). On any ``OSError`` the old file is left as it was."""
    data = encode(log)
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # which blocks a guest wrote, and when: its owner's only
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
