"""Restore points as versioned models (issue 15 item 2): points written before the
``version`` field still read, a newer format is one clear error (also through the CLI),
a new point gains only ``version``, and docs/repository.md's field table is the model."""

from __future__ import annotations

import json
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import BaseModel

from agentless.backup.errors import PointFormatError
from agentless.backup.gc import GcError, gc
from agentless.backup.keys import CorruptError
from agentless.backup.points import POINT_VERSION, RestorePoint, StoredDisk, parse_point
from agentless.backup.repository import POINT_KIND, Repository
from agentless.backup.storage import MemoryBackend
from agentless.backup.verify import verify
from tests.backup.conftest import _ok, vmbackup

POINT_ID = "5e1f0c3a9b7d2e64"
# A restore point exactly as vmbackup wrote it before restore points had a version
# (backupjob, issue 14): WinCenter's task-result VM, one disk of holes.
OLD_POINT = json.loads(
    """
{
  "time": "2026-11-30T05:00:00.123456Z",
  "vm": {
    "uuid": "6f1c2d4e-0000-4000-8000-000000000001", "name": "db", "vcpus": 2, "memory": 2147483648,
    "nics": [{"position": 0, "mac": "02:00:00:00:00:01", "network": "lan"}],
    "disks": [{"position": 0, "size": 4194304}],
    "id": "vm-3f2a", "host": "host-9c1e"
  },
  "backup_id": "vmb-20261130T050000Z-1a2b3c4d",
  "type": "full",
  "base": null,
  "consistency": "crash-consistent",
  "disks": [{
    "position": 0, "size": 4194304, "chunk_size": 65536,
    "pages": ["0000000000000000000000000000000000000000000000000000000000000000"],
    "digest": "53ce4089d0cb58e3bfa929a185881e6702f5086f32b8a093410c6d63c88f66fc",
    "type": "full", "reason": "no base backup", "read": 0
  }],
  "stats": {"read": 0, "stored": 0, "new": 0, "deduplicated": 0},
  "id": "5e1f0c3a9b7d2e64"
}
"""
)
# earlier still: no consistency, no uuid or host, no stats
OLDEST_POINT = {
    "time": "2026-10-01T05:00:00Z",
    "vm": {"id": "vm-1", "name": "web", "vcpus": 1, "memory": 1073741824, "nics": []},
    "backup_id": "b-1",
    "type": "full",
    "base": None,
    "disks": [OLD_POINT["disks"][0] | {"reason": "", "read": 0}],
}


def _sealed(repository: Repository, document: dict[str, object], point_id: str = POINT_ID) -> None:
    """*document* stored as restore point *point_id*, sealed as vmbackup seals it."""
    name = f"points/{point_id}"
    repository.backend.put(name, repository.keys.seal_meta(POINT_KIND, document | {"id": point_id}, name))


def _stored(repository: Repository, point_id: str) -> object:
    name = f"points/{point_id}"
    return repository.keys.open_meta(POINT_KIND, repository.backend.get(name), name)


@pytest.mark.parametrize("document", [OLD_POINT, OLDEST_POINT], ids=["before-version", "earliest"])
def test_a_point_written_before_versions_still_reads(document: dict[str, object]) -> None:
    repository = Repository.init(MemoryBackend())
    _sealed(repository, document)
    point = repository.load_point(POINT_ID)
    assert point.version == 1
    assert point.vm.name == document["vm"]["name"]  # type: ignore[index]
    assert point.disks[0].pages == [bytes(32).hex()]
    assert [b.vm_name for b in repository.briefs()] == [point.vm.name]
    assert repository.points()[0].vm == point.vm
    assert verify(repository, read_data=True).ok
    if document is OLD_POINT:
        assert (point.consistency, point.vm.uuid, point.vm.host) == (
            "crash-consistent",
            "6f1c2d4e-0000-4000-8000-000000000001",
            "host-9c1e",
        )
    # written again (an off-site copy): the same document, still without a version
    again = Repository.init(MemoryBackend())
    again.save_point(point, point_id=POINT_ID)
    assert _stored(again, POINT_ID) == document | {"id": POINT_ID}


def test_a_new_point_gains_only_the_version() -> None:
    old = RestorePoint.model_validate(OLD_POINT)
    new = RestorePoint(
        version=POINT_VERSION,
        time=old.time,
        vm=old.vm,
        backup_id=old.backup_id,
        type=old.type,
        base=old.base,
        consistency=old.consistency,
        disks=[StoredDisk.model_validate(d.document()) for d in old.disks],
        stats=old.stats,
    )
    repository = Repository.init(MemoryBackend())
    point_id = repository.save_point(new)
    assert _stored(repository, point_id) == OLD_POINT | {"id": point_id, "version": POINT_VERSION}


def test_a_newer_format_is_one_error_never_a_guess() -> None:
    repository = Repository.init(MemoryBackend())
    _sealed(repository, {"version": POINT_VERSION + 98, "volumes": "a shape this version cannot know"})
    with pytest.raises(PointFormatError, match=f"format {POINT_VERSION + 98} is newer.*upgrade vmbackup"):
        repository.load_point(POINT_ID)
    with pytest.raises(PointFormatError, match="newer"):
        repository.briefs()
    report = verify(repository)
    assert POINT_ID in report.affected and "upgrade vmbackup" in report.problems[0]
    with pytest.raises(GcError, match="upgrade vmbackup"):
        gc(repository)  # never deletes data a point it cannot read may use


@pytest.mark.parametrize("version", [0, -1, "2", 1.5, None, True])
def test_a_version_that_is_no_positive_integer_is_corrupt(version: object) -> None:
    with pytest.raises(CorruptError, match="malformed restore point"):
        parse_point(OLD_POINT | {"version": version}, "points/x")


def test_vmbackup_show_and_list_of_a_newer_point_say_one_line(tmp_path: Path) -> None:
    where = tmp_path / "repo"
    with Repository.init(str(where)) as repository:
        _sealed(repository, OLD_POINT | {"version": 99})
    env = os.environ | {
        "VMBACKUP_REPO": str(where),
        "VMBACKUP_CONFIG": str(tmp_path / "vmbackup.json"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    env.pop("VMBACKUP_PASSWORD", None)
    for command in (["show", POINT_ID], ["list"], ["show", POINT_ID, "--json"]):
        done = vmbackup(env, *command)
        assert done.returncode == 1, (command, done.stdout)
        assert done.stderr == (
            f"vmbackup: points/{POINT_ID}: restore point format 99 is newer than this vmbackup reads "
            f"(up to {POINT_VERSION}): upgrade vmbackup\n"
        ), command
    with Repository.open(str(where)) as repository:
        _sealed(repository, OLD_POINT)  # the same point in the format this version reads
    shown = _ok(vmbackup(env, "show", POINT_ID, "--json"))
    assert shown == OLD_POINT | {"id": POINT_ID}


# ---------------------------------------------------------------------- the reference


def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Every field of *model* by its path (``vm.nics[].network``), nested models'
    too, each with the path's own kind (``object``, ``list`` or a leaf)."""
    found: dict[str, str] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        inner = _nested(field.annotation)
        if inner is None:
            found[path] = "leaf"
        else:
            nested, many = inner
            found[path] = "list" if many else "object"
            found |= _fields(nested, f"{path}[]." if many else f"{path}.")
    return found


def _nested(annotation: object) -> tuple[type[BaseModel], bool] | None:
    """The model an annotation holds (itself, optional, or a list of it), and whether a
    list; None for a leaf."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (list, Sequence) and arguments:
        inner = _nested(arguments[0])
        return None if inner is None else (inner[0], True)
    if origin in (typing.Union, types.UnionType):
        for argument in arguments:
            inner = _nested(argument)
            if inner is not None:
                return inner
    return None


def test_the_reference_table_in_docs_is_the_model() -> None:
    text = (Path(__file__).parents[2] / "docs" / "repository.md").read_text()
    section = text.split("\n## Restore points\n", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", section, re.MULTILINE)
    documented = {path: kind.strip() for path, kind in rows}
    model = _fields(RestorePoint)
    assert len(rows) == len(documented)  # no field twice
    only_docs, only_model = sorted(set(documented) - set(model)), sorted(set(model) - set(documented))
    assert not only_docs and not only_model, f"only in docs: {only_docs}; only in the model: {only_model}"
    for path, kind in model.items():  # containers are documented as such
        if kind != "leaf":
            assert documented[path] == kind, path
    assert {"consistency", "vm.uuid", "vm.host", "version"} <= set(documented)
