"""Structural check of a VHD file and of the chain above it.

Opening a file already refuses anything that would make reads wrong (checksums, header and
BAT bounds, blocks outside the file or overlapping each other or the metadata). The check
adds what a reader can survive but a sound file never has: a footer copy that differs from
the footer, BAT entries past the disk's last block, parent locators outside the file or
over data, trailing bytes after a fixed disk's data; and it walks the parents.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from .bat import BAT_UNUSED, blocks_for, decode_bat
from .chain import Chain
from .errors import ChainError, CorruptVhdError, VhdError
from .footer import FOOTER_SIZE
from .image import VhdImage

__all__ = ["Problem", "check"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong: the file, the field (``footer.checksum``, ``bat[12]``...), the byte
    offset in the file where it lies (None when it has none), and why."""

    path: str
    field: str
    offset: int | None
    reason: str

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None else ""
        return f"{self.path}: {self.field}{where}: {self.reason}"


def _from_error(error: VhdError, path: str) -> Problem:
    if isinstance(error, CorruptVhdError):
        return Problem(error.path, error.field, error.offset, error.reason)
    if isinstance(error, ChainError):
        return Problem(error.path, "parent", None, error.reason)
    return Problem(path, "file", None, str(error))


def _check_image(image: VhdImage) -> list[Problem]:
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
    copy = os.pread(image.fd, FOOTER_SIZE, 0)
    footer = os.pread(image.fd, FOOTER_SIZE, image.footer_offset)
    if copy != footer:
        problems.append(Problem(path, "footer copy", 0, "differs from the footer at the end of the file"))
    needed = blocks_for(image.size, image.block_size)
    extra = header.max_table_entries - needed
    if extra > 0:
        raw = os.pread(image.fd, 4 * extra, header.table_offset + 4 * needed)
        used = np.flatnonzero(decode_bat(raw) != BAT_UNUSED)
        if used.size:
            index = needed + int(used[0])
            problems.append(
                Problem(
                    path,
                    f"bat[{index}]",
                    header.table_offset + 4 * index,
                    f"entry past the last block ({needed - 1}) of the disk is allocated",
                )
            )
    blocks = image.bat[image.bat != BAT_UNUSED].astype(np.int64) * 512
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
    if image.is_differencing and header.parent_unique_id is None:
        problems.append(
            Problem(
                path,
                "header.parent_unique_id",
                image.footer.data_offset + 40,
                "differencing disk without parent id",
            )
        )
    return problems


def check(path: str | os.PathLike[str]) -> list[Problem]:
    """Every problem found in *path* and its parents; an empty list means sound."""
    name = os.fspath(path)
    try:
        chain = Chain.open(name)
    except VhdError as error:
        return [_from_error(error, name)]
    with chain:
        problems: list[Problem] = []
        for image in chain.layers:
            problems.extend(_check_image(image))
        return problems
