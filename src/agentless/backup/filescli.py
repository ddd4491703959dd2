"""``vmbackup files RP``: what the disks of a restore point hold – partitions and file
systems – read from the repository alone, without WinCenter, a restore or a mount
(``docs/file-restore.md``).

Each disk is read through a :class:`.diskview.DiskView` (chunks fetched lazily, each
checked) by a worker process (:mod:`.fsworker`) that parses the guest's bytes under
resource limits and holds no secret; a disk the worker cannot read (it crashed or hung
on it) is one line, and the other disks are still described.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any

from agentless.commands import emit
from agentless.units import format_size

from .clitools import Command, open_repository
from .diskview import DiskView
from .errors import VmbackupError
from .extract import Extraction
from .fsworker import FsWorker, FsWorkerError
from .pointdisk import PointDisk
from .storage import StorageError

__all__ = ["ERRORS", "add_commands"]

ERRORS = (VmbackupError, StorageError)


class FilesError(VmbackupError):
    """A ``files`` command asked for something it cannot do (the message says what)."""


def _describe(repository_disk: PointDisk) -> dict[str, Any]:
    """The probe of one disk (its table, volumes and problems), or its error."""
    with DiskView(repository_disk) as view, FsWorker(view, view.size) as worker:
        try:
            found: dict[str, Any] = worker.call("probe")
        except FsWorkerError as error:
            return {"error": str(error)}
        found["fetched"] = view.fetched
        return found


def _lines(disk: dict[str, Any]) -> list[str]:
    head = f"disk {disk['disk']} ({format_size(disk['size'])})"
    if "error" in disk:
        return [f"{head}: cannot be read: {disk['error']}"]
    scheme = {"mbr": "MBR", "gpt": "GPT", "none": "no partition table"}[disk["scheme"]]
    lines = [f"{head}: {scheme}" + (f" {disk['id']}" if disk["id"] else "")]
    for volume in disk["volumes"]:
        if "logical_volume" in volume:
            where = f"  logical volume {volume['partition']}"
        else:
            where = "whole disk" if volume["partition"] == 0 else f"partition {volume['partition']}"
        text = f"  {where}: {volume['filesystem']}, {format_size(volume['size'])}"
        text += f" at {format_size(volume['start'])}" if volume["start"] else ""
        text += f", label {volume['label']!r}" if volume["label"] else ""
        text += f", UUID {volume['uuid']}" if volume["uuid"] else ""
        text += f" (type {volume['type']})" if volume["type"] else ""
        if volume.get("problem"):
            text += f" – {volume['problem']}"
        lines.append(text)
    lines += [f"  problem: {problem}" for problem in disk["problems"]]
    return lines


def _partition(text: str) -> int | str:
    """``--partition``: a partition's number as ``files RP`` shows it, or a logical
    volume ``VG/LV`` (LVM's names: letters, digits and ``+_.-``, not starting with ``-``)."""
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    if re.fullmatch(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*/[A-Za-z0-9+_.][A-Za-z0-9+_.-]*", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a partition number nor VG/LV")


_KIND = {"file": "-", "dir": "d", "symlink": "l", "fifo": "p", "socket": "s", "char": "c", "block": "b"}


def _long(entry: dict[str, Any]) -> str:
    """One entry as ``ls -l`` shows it (times in UTC; NTFS and FAT have no mode or owner,
    and a FAT time out of range is none: ``?``)."""
    kind = _KIND.get(entry["type"], "?")
    mode = "?????????" if entry["mode"] is None else stat.filemode(entry["mode"])[1:]
    owner = "?" if entry["uid"] is None else f"{entry['uid']} {entry['gid']}"
    when = "????-??-?? ??:??:??"
    if entry["mtime"] is not None:
        when = datetime.datetime.fromtimestamp(entry["mtime"] / 1e9, datetime.UTC).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
    target = f" -> {entry['target']}" if entry["target"] else ""
    return f"{kind}{mode} {owner:>11} {entry['size']:>12} {when} {entry['path']}{target}{_problem(entry)}"


def _problem(entry: dict[str, Any]) -> str:
    """What is said after an entry the parser could not read (nothing after the others)."""
    return f"  (unreadable: {entry['problem']})" if entry.get("problem") else ""


@contextlib.contextmanager
def _worker(args: argparse.Namespace) -> Iterator[tuple[str, DiskView, FsWorker]]:
    """(restore point id, the disk's view, a worker over it) for ``ls`` and ``get``:
    disk ``--disk`` (default 0) of RP, read under a shared lock of the repository. The
    worker's errors that end the command name the disk."""
    with open_repository(args) as repository, repository.lock("shared", "files"):
        point = repository.load_point(args.point)
        source = PointDisk(repository, point, args.disk or 0)
        with DiskView(source) as view, FsWorker(view, view.size) as worker:
            try:
                yield point.id, view, worker
            except FsWorkerError as error:
                raise FilesError(f"disk {args.disk or 0}: {error}") from None


def _cmd_ls(args: argparse.Namespace) -> int:
    """The entries, printed as they come from the worker (batches of 1 000): a listing
    of millions is never held here. With --json, one document streamed: the request's
    fields, ``entries`` (one per line), then ``fetched``."""
    asked = {"partition": args.partition, "path": args.path, "recursive": args.recursive}
    out = sys.stdout
    with _worker(args) as (point, view, worker):
        if not args.json:
            show = _long if args.long else lambda e: e["path"] + _problem(e)
            worker.call("list", on_items=lambda batch: print("\n".join(map(show, batch))), **asked)
            return 0
        head = {"point": point, "disk": args.disk or 0, "partition": args.partition, "path": args.path}
        out.write(json.dumps(head)[:-1] + ', "entries": [')
        separator = "\n"

        def write(batch: list[dict[str, Any]]) -> None:
            nonlocal separator
            for entry in batch:
                out.write(separator + json.dumps(entry))
                separator = ",\n"

        worker.call("list", on_items=write, **asked)
        out.write(f'\n], "fetched": {view.fetched}}}\n')
    return 0


OnWritten = Callable[[int, int], None]  # bytes written, bytes to write


def _cmd_get(args: argparse.Namespace) -> int:
    with _worker(args) as (point, view, worker), _bar(args) as progress:
        if args.output == "-":
            if len(args.paths) != 1:
                raise FilesError("-o - streams one file: give one PATH")
            _stream(worker, args.partition, args.paths[0], progress)
            return 0
        if not os.path.isdir(args.output):
            raise FilesError(f"{args.output}: not a directory (make it first)")
        with Extraction(worker, args.partition, args.output, progress) as extraction:
            for path in args.paths:
                extraction.get(path)
    done = {
        "point": point,
        "files": extraction.files,
        "directories": extraction.directories,
        "links": extraction.links,
        "bytes": extraction.written,
        "fetched": view.fetched,
        "skipped": [dataclasses.asdict(s) for s in extraction.skipped],
    }
    lines = [
        f"wrote {extraction.files} files, {extraction.directories} directories and {extraction.links} "
        f"links ({format_size(extraction.written)}) under {args.output}"
    ]
    lines += [f"skipped {s.path}: {s.reason}" for s in extraction.skipped]
    emit(args, done, "\n".join(lines))
    return 1 if extraction.skipped else 0


def _stream(worker: FsWorker, partition: int | str, path: str, progress: OnWritten | None) -> None:
    """The regular file *path* to standard output (read by the inode its ``stat`` gave:
    the path is looked up once)."""
    found = worker.call("stat", partition=partition, path=path)
    size = int(found["size"])
    out = sys.stdout.buffer
    written = 0

    def write(data: bytes | bytearray) -> None:
        nonlocal written
        out.write(data)
        written += len(data)
        if progress is not None:
            progress(written, size)

    worker.call("read", on_bytes=write, partition=partition, path=path, inode=found["inode"])
    out.flush()


@contextlib.contextmanager
def _bar(args: argparse.Namespace) -> Iterator[OnWritten | None]:
    """A progress bar of the bytes written (rate, time left) on a terminal's standard
    error; None without one, or with --json."""
    if getattr(args, "json", False) or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("extracting", *columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("extracting", total=None)

        def show(written: int, size: int) -> None:
            bar.update(task, completed=written, total=size or None)

        yield show


def _cmd_files(args: argparse.Namespace) -> int:
    if args.action == "ls":
        return _cmd_ls(args)
    if args.action == "get":
        return _cmd_get(args)
    with open_repository(args) as repository, repository.lock("shared", "files"):
        point = repository.load_point(args.point)
        positions = [args.disk] if args.disk is not None else [d.position for d in point.disks]
        disks = []
        for position in positions:
            source = PointDisk(repository, point, position)
            disks.append({"disk": position, "size": source.size, **_describe(source)})
    text = "\n".join(line for disk in disks for line in _lines(disk))
    emit(args, {"point": point.id, "disks": disks}, f"restore point {point.id}\n{text}")
    return 1 if any("error" in disk for disk in disks) else 0


def add_commands(command: Command) -> None:
    """Add ``files`` through the main parser's *command* maker."""
    p = command("files", "partitions and file systems of a restore point's disks (no restore, no mount)")
    p.add_argument("point", metavar="RP", help="restore point id (or a unique prefix)")
    p.add_argument("--disk", type=int, metavar="N", help="only disk N (default: every disk)")
    p.set_defaults(handler=_cmd_files, action=None)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    ls = actions.add_parser("ls", help="list a directory of a file system in the restore point")
    ls.add_argument("--disk", type=int, default=argparse.SUPPRESS, help="disk position (default 0)")
    ls.add_argument(
        "--partition",
        type=_partition,
        default=0,
        help="partition number as `files RP` shows it (0: the whole disk), or a logical volume VG/LV",
    )
    ls.add_argument("path", metavar="PATH", help="a path from the file system's root, / separated")
    ls.add_argument("--long", "-l", action="store_true", help="type, mode, owner, size, mtime, link target")
    ls.add_argument("--recursive", "-R", action="store_true", help="every entry below PATH")
    ls.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print a JSON document")
    get = actions.add_parser("get", help="write files and directories of the restore point under a directory")
    get.add_argument("--disk", type=int, default=argparse.SUPPRESS, help="disk position (default 0)")
    get.add_argument(
        "--partition", type=_partition, default=0, help="partition number as `files RP` shows it, or VG/LV"
    )
    get.add_argument(
        "paths", nargs="+", metavar="PATH", help="files or directories, / separated from the root"
    )
    get.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        help="an existing directory, or - for one file to stdout",
    )
    get.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print a JSON document")
