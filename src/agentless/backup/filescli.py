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
from typing import Any

from agentless.commands import emit
from agentless.units import format_size

from .clitools import Command, open_repository
from .diskview import DiskView
from .errors import VmbackupError
from .fsworker import FsWorker, FsWorkerError
from .pointdisk import PointDisk
from .storage import StorageError

__all__ = ["ERRORS", "add_commands"]

ERRORS = (VmbackupError, StorageError)


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
        where = "whole disk" if volume["partition"] == 0 else f"partition {volume['partition']}"
        text = f"  {where}: {volume['filesystem']}, {format_size(volume['size'])}"
        text += f" at {format_size(volume['start'])}" if volume["partition"] else ""
        text += f", label {volume['label']!r}" if volume["label"] else ""
        text += f", UUID {volume['uuid']}" if volume["uuid"] else ""
        text += f" (type {volume['type']})" if volume["type"] else ""
        if volume.get("problem"):
            text += f" – {volume['problem']}"
        lines.append(text)
    lines += [f"  problem: {problem}" for problem in disk["problems"]]
    return lines


def _cmd_files(args: argparse.Namespace) -> int:
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
    p.set_defaults(handler=_cmd_files)
