"""Index compaction: the repository's small index files merged into large ones.

Every backup writes at least one index file, and gc rewrites the files it drops entries
from, so without compaction a repository of years of nightly backups holds tens of
thousands of small index files – each one a request for a machine whose cache is cold,
and each a file the cache tracks. Compaction (``vmbackup index compact``, and gc at the
end of every run) merges the files holding fewer than half of :data:`~.indexfile.FILE_ENTRIES`
entries into files of up to FILE_ENTRIES, so that the number of index files stays about
``blobs / (FILE_ENTRIES / 2)`` plus a few, whatever the number of backups made – as
kopia's index compaction does.

It changes where entries are written, never which entries exist: the merged files are
written first (content-addressed, each blob at most once per file – a blob in two packs
goes to two files, as readers of the JSON form expect), and only then the small files
deleted. A reader in between sees an entry twice, which is harmless (a compaction that
crashed after writing may leave entries twice for good; the number of files stays within
the bound). It runs under the
``gc`` lock (another gc or compaction would delete files it is merging) and checks the
lock is still held before it deletes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .indexfile import FILE_ENTRIES, Entries
from .keys import CorruptError, RepositoryError
from .locks import Lock
from .repository import Repository
from .storage import NotFound

__all__ = ["CompactReport", "IndexCompactError", "compact_index"]


class IndexCompactError(RepositoryError):
    """An index file to merge does not check: nothing was deleted (run ``vmbackup verify``)."""


@dataclasses.dataclass
class CompactReport:
    """``merged``: the index files merged (then deleted); ``written``: the files that
    replace them; ``entries``: how many entries moved; ``files``: index files after."""

    merged: list[str] = dataclasses.field(default_factory=list)
    written: list[str] = dataclasses.field(default_factory=list)
    entries: int = 0
    files: int = 0


def compact_index(repo: Repository, lock: Lock, target: int = FILE_ENTRIES) -> CompactReport:
    """Merge *repo*'s index files of fewer than *target* / 2 entries into files of up to
    *target* (module docstring), holding *lock* (a ``gc`` lock)."""
    report = CompactReport()
    try:
        index = repo.index(reload=True)
        counts = index.entry_counts()
    except CorruptError as error:
        raise IndexCompactError(
            f"index compact: {error}: run `vmbackup verify`; nothing was deleted"
        ) from None
    small = sorted(name for name, count in counts.items() if count < target // 2)
    if len(small) < 2:
        report.files = len(counts)
        return report
    pending: list[Entries] = []
    held = 0
    with index.adding_many():  # the files written become runs merged once, at the end
        for name in small:
            try:
                entries = repo.read_index_entries(name)
            except NotFound:
                continue  # gone since the listing: nothing to merge
            except CorruptError as error:
                what = f"index compact: {error}: run `vmbackup verify`; nothing was deleted"
                raise IndexCompactError(what) from None
            report.merged.append(name)
            pending.append(entries)
            held += len(entries)
            if held >= target:  # at most about 2 × target entries in memory
                report.written += _write(repo, pending, target, final=False)
                held = sum(len(e) for e in pending)
        report.written += _write(repo, pending, target, final=True)
    report.entries = sum(counts.get(name, 0) for name in report.merged)
    lock.check_held()
    for name in report.merged:
        if name not in report.written:  # the same content merged into the same name
            repo.backend.delete(name)
    report.files = len(set(repo.backend.list("index/")))
    repo.index(reload=True)
    return report


def _write(repo: Repository, pending: list[Entries], target: int, final: bool) -> list[str]:
    """Write the entries of *pending* as index files of *target* entries, each blob at
    most once per file; what is left (fewer than *target*) stays in *pending*, unless
    *final*: then it is written too. The names written."""
    if not pending:
        return []
    merged = _concatenate(pending)
    pending.clear()
    written: list[str] = []
    while len(merged):
        first, merged = _one_per_blob(merged)
        end = len(first) if final else len(first) - len(first) % target
        for start in range(0, end, target):
            written.append(repo.write_index_file(_take(first, np.arange(start, min(start + target, end)))))
        if end < len(first):
            pending.append(_take(first, np.arange(end, len(first))))
    return written


def _concatenate(parts: list[Entries]) -> Entries:
    """One Entries of *parts*, their pack tables joined."""
    ids, values, packs = [], [], []
    base = 0
    for part in parts:
        shifted = np.array(part.values)
        shifted["pack"] += np.uint32(base)
        base += len(part.packs)
        ids.append(part.ids)
        values.append(shifted)
        packs.append(part.packs)
    return Entries(np.concatenate(ids), np.concatenate(values), np.concatenate(packs)).sorted()


def _one_per_blob(entries: Entries) -> tuple[Entries, Entries]:
    """(the first entry of each blob, the other entries) of *entries* (sorted by id)."""
    first = np.ones(len(entries), bool)
    first[1:] = entries.ids[1:] != entries.ids[:-1]
    return _take(entries, np.nonzero(first)[0]), _take(entries, np.nonzero(~first)[0])


def _take(entries: Entries, rows: np.ndarray) -> Entries:
    """The entries *rows* of *entries*, with a pack table of only the packs they name."""
    values = np.array(entries.values[rows])
    used, numbers = np.unique(values["pack"], return_inverse=True)
    values["pack"] = numbers.astype(np.uint32)
    return Entries(entries.ids[rows], values, entries.packs[used])
