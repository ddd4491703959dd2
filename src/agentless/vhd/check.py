"""Structural check of a VHD file and of the chain above it.

Opening a file refuses anything that would make reads wrong (checksums, header and BAT
bounds, blocks outside the file or overlapping each other or the metadata). The check
reports every damaged structure, also those a reader could survive, and goes on past
what it can recover from, so that one run names everything wrong::

    footer at the end   damaged?  ── the copy at offset 0 is sound ──▶ read the copy, go on
                                  └─ no sound copy ──────────────────▶ stop: nothing to go by
    footer copy at 0    damaged, or differs from the footer at the end
    dynamic header      damaged?  ── no copy exists ─────────────────▶ stop
    BAT                 blocks past the footer, overlapping each other or the metadata;
                        entries past the disk's last block allocated
    parent locators     outside the file, over data, undecodable
    parents             the same for every file of the chain

Each :class:`Problem` says which copy was read instead of the damaged structure (``used``)
and, when :func:`agentless.vhd.repair.repair` can mend it, how (``fix``) and with which
writes. Repairs are offered only while the BAT is sound: then the layout of the file is
known and each write lands on the damaged structure alone. Nothing else rewrites a damaged
footer: opening refuses the file, so no later write of a reader would.
"""

from __future__ import annotations

import dataclasses
import os
import stat

import numpy as np

from .bat import BAT_UNUSED, blocks_for, decode_bat
from .chain import MAX_CHAIN_DEPTH, open_parent
from .errors import ChainError, CorruptVhdError, VhdError
from .footer import COOKIE, DISK_TYPE_FIXED, FOOTER_SIZE, SECTOR_SIZE, Footer
from .image import VhdImage

__all__ = ["Problem", "check"]

_END = "the footer at the end"
_COPY = "the footer copy at offset 0"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong: the file, the field (``footer.checksum``, ``bat[12]``...), the byte
    offset in the file where it lies (None when it has none), and why.

    ``used`` names the copy the check read instead of the damaged structure (empty when
    there was none); ``fix`` says what :func:`~agentless.vhd.repair.repair` does about it
    (empty when it cannot help: restore the disk, or put its parent back); ``writes`` are
    the (offset, bytes) it writes to do so."""

    path: str
    field: str
    offset: int | None
    reason: str
    used: str = ""
    fix: str = ""
    writes: tuple[tuple[int, bytes], ...] = dataclasses.field(default=(), repr=False, compare=False)

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None else ""
        instead = f" (read {self.used} instead)" if self.used else ""
        return f"{self.path}: {self.field}{where}: {self.reason}{instead}"


class _Unreadable(Exception):
    """The file cannot be read any further; ``problems`` says why."""

    def __init__(self, problems: list[Problem]):
        super().__init__(problems[0] if problems else "unreadable")
        self.problems = problems


def _from_error(error: VhdError, path: str, prefix: str = "") -> Problem:
    """*error* as a problem; *prefix* replaces the leading ``footer`` of its field (the
    copy at offset 0 is checked as a footer)."""
    if isinstance(error, CorruptVhdError):
        field = prefix + error.field.removeprefix("footer") if prefix else error.field
        return Problem(error.path, field, error.offset, error.reason)
    if isinstance(error, ChainError):
        return Problem(error.path, "parent", None, error.reason)
    return Problem(path, "file", None, str(error))


def _unpack(raw: bytes, path: str, offset: int) -> Footer | CorruptVhdError:
    try:
        return Footer.unpack(raw, path, offset)
    except CorruptVhdError as error:
        return error


def _footers(path: str) -> tuple[Footer, list[Problem], list[Problem]]:
    """The footer to go by, the problems of the footer at the end, those of the copy at 0.

    The footer at the end is the one the specification makes authoritative; when it is
    damaged, a sound copy of a dynamic or differencing disk stands in for it. A fixed disk
    has no copy (its data start at 0)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise VhdError(f"{path}: not a regular file")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < FOOTER_SIZE:
            raise _Unreadable([Problem(path, "footer", 0, f"file of {size} bytes is too short")])
        end = size - FOOTER_SIZE
        tail = os.pread(fd, FOOTER_SIZE, end)
        head = os.pread(fd, FOOTER_SIZE, 0)
    finally:
        os.close(fd)
    footer = _unpack(tail, path, end)
    if isinstance(footer, Footer):
        if footer.disk_type == DISK_TYPE_FIXED or head == tail:
            return footer, [], []
        copy = _unpack(head, path, 0)
        fix = (((0, tail),), "rewrite the footer copy at offset 0 from the footer at the end")
        if isinstance(copy, Footer):
            problem = Problem(path, "footer copy", 0, "differs from the footer at the end of the file")
        else:
            problem = _from_error(copy, path, "footer copy")
        return footer, [], [_repairable(problem, _END, *fix)]
    spare = _unpack(head, path, 0) if head[:8] == COOKIE else None
    damaged = _from_error(footer, path)
    if isinstance(spare, Footer) and spare.disk_type != DISK_TYPE_FIXED:
        writes = ((end, head),) if end % SECTOR_SIZE == 0 else ()
        fixed = _repairable(damaged, _COPY, writes, "rewrite the footer at the end from the copy at offset 0")
        return spare, [fixed], []
    if isinstance(spare, CorruptVhdError):
        raise _Unreadable([damaged, _from_error(spare, path, "footer copy")])
    raise _Unreadable([damaged])


def _repairable(problem: Problem, used: str, writes: tuple[tuple[int, bytes], ...], fix: str) -> Problem:
    return dataclasses.replace(problem, used=used, writes=writes, fix=fix if writes else "")


def _extra_entries(image: VhdImage) -> list[Problem]:
    """BAT entries past the disk's last block that are allocated: never read, but a sound
    file has them unused (what :func:`repair` sets them to)."""
    header = image.header
    assert header is not None
    needed = blocks_for(image.size, image.block_size)
    extra = header.max_table_entries - needed
    if extra <= 0:
        return []
    at = header.table_offset + 4 * needed
    used = np.flatnonzero(decode_bat(os.pread(image.fd, 4 * extra, at)) != BAT_UNUSED)
    if not used.size:
        return []
    index = needed + int(used[0])
    more = f" (and {used.size - 1} more)" if used.size > 1 else ""
    return [
        Problem(
            image.path,
            f"bat[{index}]",
            header.table_offset + 4 * index,
            f"entry past the last block ({needed - 1}) of the disk is allocated{more}",
            fix="mark the BAT entries past the disk's last block unused",
            writes=((at, b"\xff" * (4 * extra)),),
        )
    ]


def _layout(image: VhdImage) -> list[Problem]:
    """What a reader can survive but a sound file never has: locators outside the file or
    over data, bytes after a fixed disk's data. (A differencing disk without a parent id
    is reported by the walk to its parent.)"""
    problems: list[Problem] = []
    path = image.path
    header = image.header
    if header is None:
        if image.footer_offset != image.size:
            problems.append(
                Problem(
                    path,
                    "footer",
                    image.footer_offset,
                    f"fixed disk of {image.size} bytes has {image.footer_offset - image.size} "
                    "extra bytes before the footer",
                )
            )
        return problems
    blocks = image.bat[image.bat != BAT_UNUSED].astype(np.int64) * SECTOR_SIZE
    block_total = image.bitmap_size + image.block_size
    for i, (loc, text) in enumerate(image.locators()):
        field = f"header.parent_locator[{i}]"
        at = image.footer.data_offset + header.locator_field_offset(i)
        if loc.offset + max(loc.length, loc.space) > image.footer_offset or loc.length > 64 * 1024:
            problems.append(Problem(path, field, at, f"data at {loc.offset} lies outside the file"))
            continue
        hit = (blocks < loc.offset + loc.length) & (blocks + block_total > loc.offset)
        if loc.length and hit.any():
            problems.append(Problem(path, field, at, f"data at {loc.offset} overlaps a data block"))
        if text is None:
            problems.append(Problem(path, field, at, f"unknown platform code {loc.platform!r}"))
        elif "\0" in text:
            problems.append(Problem(path, field, at, "path holds a NUL character"))
    return problems


def _inspect(path: str) -> tuple[VhdImage, list[Problem]]:
    """Open the file *path* as far as it can be read, and everything wrong with it (not
    its parents), in the order: footer at the end, header and BAT, footer copy, layout.
    The image is opened read-only with the footer that was used and an unchecked BAT: for
    looking at the structure only. Raises ``_Unreadable`` with the problems when nothing
    past them can be read, ``OSError`` as the system reports it."""
    footer, at_end, copy = _footers(path)
    try:
        image = VhdImage.open(path, footer=footer, validate=False)
    except CorruptVhdError as error:
        raise _Unreadable([*at_end, _from_error(error, path), *copy]) from None
    try:
        structure = [_from_error(error, path) for error in image.bat_problems()]
        problems = [*at_end, *structure, *copy]
        if image.header is not None:
            problems += _extra_entries(image)
        problems += _layout(image)
        if structure:  # the layout is in doubt: no write can be trusted to land right
            problems = [dataclasses.replace(p, fix="", writes=()) for p in problems]
        return image, problems
    except BaseException:
        image.close()
        raise


def check(path: str | os.PathLike[str]) -> list[Problem]:
    """Every problem found in *path* and its parents, the leaf's first; an empty list
    means sound. ``OSError`` (a missing file) as the system reports it."""
    name = os.fspath(path)
    problems: list[Problem] = []
    layers: list[VhdImage] = []
    try:
        try:
            image, found = _inspect(name)
        except _Unreadable as unreadable:
            return unreadable.problems
        except VhdError as error:
            return [_from_error(error, name)]
        layers.append(image)
        problems += found
        st = os.fstat(image.fd)
        seen = {(st.st_dev, st.st_ino)}
        candidates: dict[str, list[Problem]] = {}  # the problems of each parent candidate

        def opener(candidate: str) -> VhdImage:
            opened, found = _inspect(candidate)
            candidates[candidate] = found
            return opened

        while layers[-1].is_differencing:
            if len(layers) >= MAX_CHAIN_DEPTH:
                problems.append(Problem(name, "parent", None, f"chain deeper than {MAX_CHAIN_DEPTH}"))
                break
            try:
                parent = open_parent(layers[-1], seen, opener)
            except _Unreadable as unreadable:
                problems += unreadable.problems
                break
            except VhdError as error:
                problems.append(_from_error(error, layers[-1].path))
                break
            layers.append(parent)
            problems += candidates[parent.path]
            st = os.fstat(parent.fd)
            seen.add((st.st_dev, st.st_ino))
        return problems
    finally:
        for layer in layers:
            layer.close()
