"""Repair of what :func:`~agentless.vhd.check.check` finds and knows how to mend.

A VHD keeps one structure twice: the footer, at the end and (dynamic and differencing
disks) at offset 0. When one copy is damaged and the other sound, the damaged one is
rewritten from the sound one. Allocated BAT entries past the disk's last block (never
read) are marked unused. Nothing else is repaired: a damaged dynamic header, BAT or
block has no second copy, and guessing would hand a guest wrong data – such a disk is
restored from a backup.

Repairs are done only while the BAT is sound (the check offers none otherwise), each one
a write over the damaged structure alone, then an fsync; a repair killed midway leaves
the file no worse, and running it again finishes it. Only the file named is written, never
its parents (repair them by name). No other program may have the file open meanwhile.
"""

from __future__ import annotations

import dataclasses
import os

from agentless.fileio import pwrite_all

from .check import Problem, check

__all__ = ["RepairReport", "repair"]


@dataclasses.dataclass(frozen=True)
class RepairReport:
    """``repaired``: the problems of the file that were mended; ``remaining``: what the
    check of the file and its chain finds afterwards (empty: sound)."""

    path: str
    repaired: list[Problem]
    remaining: list[Problem]


def repair(path: str | os.PathLike[str]) -> RepairReport:
    """Mend in *path* every problem the check says can be mended (``Problem.fix``), and
    check again. ``OSError`` as the system reports it (nothing is written before the
    file opens for writing)."""
    name = os.fspath(path)
    todo = [p for p in check(name) if p.path == name and p.writes]
    if todo:
        fd = os.open(name, os.O_WRONLY)
        try:
            for problem in todo:
                for offset, data in problem.writes:
                    pwrite_all(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    return RepairReport(name, todo, check(name))
