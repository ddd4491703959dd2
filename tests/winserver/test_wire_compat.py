"""The host API's answers as a host served them before the wire models (main as of
c8915d3, written out literally): each still parses into its model, and the model written
back holds every key and value the old document had (new keys may only be added)."""

from __future__ import annotations

import json

import pydantic
import pytest

from agentless.wire import (
    ChangedBlocks,
    GrantList,
    HostInfo,
    PreparedBackup,
    Problem,
    RemoteAccessStopped,
    SmInfo,
    SnapshotDeleted,
    SnapshotList,
    SnapshotTaken,
    SrInfo,
    SrList,
    VdiInfo,
    VdiList,
    VmDeleted,
    VmInfo,
    VmList,
    WriteAccess,
)

CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
VM_HALTED = """{"uuid": "6f0d3d8e-0d5e-4b7c-9d0e-2f1f4a1c7b10", "name": "web", "vcpus": 2,
 "memory": 536870912, "power_state": "halted", "driver": "none",
 "created": "2026-12-03T10:00:00.000001+00:00",
 "disks": [{"position": 0, "vdi": "a1b2c3d4-0000-4000-8000-000000000001",
            "sr": "5e7d0000-0000-4000-8000-00000000000a", "size": 8388608,
            "path": "/h/sr/default/a1b2c3d4-0000-4000-8000-000000000001.vhd",
            "cbt_enabled": true, "guest_socket": null}],
 "nics": [{"position": 0, "mac": "02:11:22:33:44:55", "network": "lan"}]}"""
VM_RUNNING = """{"uuid": "6f0d3d8e-0d5e-4b7c-9d0e-2f1f4a1c7b10", "name": "web", "vcpus": 2,
 "memory": 536870912, "power_state": "running", "driver": "qemu",
 "created": "2026-12-03T10:00:00.000001+00:00",
 "disks": [{"position": 0, "vdi": "a1b2c3d4-0000-4000-8000-000000000001",
            "sr": "5e7d0000-0000-4000-8000-00000000000a", "size": 8388608,
            "path": "/h/sr/default/0b0b0000-0000-4000-8000-000000000002.vhd",
            "cbt_enabled": true, "guest_socket": "/h/run/6f0d3d8e-0.sock", "guest_connections": 1}],
 "nics": [], "qemu_pid": 4242}"""
ACCESS = f"""{{"address": "127.0.0.1", "port": 10809, "export_name": "Zt3q-grant-token",
 "cert": {json.dumps(CERT)}, "subject": "CN=host", "size": 8388608, "read_only": true,
 "expires": "2026-12-03T22:00:00Z"}}"""

OLD_ANSWERS: list[tuple[type[pydantic.BaseModel], str]] = [
    (
        HostInfo,
        f"""{{"uuid": "h-1", "name": "host1", "addresses": ["127.0.0.1", "localhost"],
        "api_port": 8443, "nbd_port": 10809, "max_chain_depth": 3, "garbage_pending": false,
        "cert": {json.dumps(CERT)}, "version": "0.1.0"}}""",
    ),
    (
        SrList,
        """{"srs": [{"uuid": "5e7d0000-0000-4000-8000-00000000000a", "name": "default",
        "path": "/h/sr/default", "default": true, "vdis": 3}]}""",
    ),
    (SrInfo, """{"uuid": "s-2", "name": "fast", "path": "/fast", "default": false, "vdis": 0}"""),
    (
        VdiList,
        """{"vdis": [{"uuid": "v-1", "name": "web disk 0", "sr": "s-1", "size": 8388608,
        "path": "/h/sr/default/v-1.vhd", "snapshot_of": null, "snapshot": null,
        "cbt_enabled": true, "data_destroyed": false, "created": "2026-12-03T10:00:00.000001+00:00"},
        {"uuid": "v-2", "name": "web disk 0 (b1)", "sr": "s-1", "size": 8388608, "path": null,
        "snapshot_of": "v-1", "snapshot": "snap-1", "cbt_enabled": true, "data_destroyed": true,
        "created": "2026-12-03T10:01:00.000001+00:00"}]}""",
    ),
    (
        VdiInfo,
        """{"uuid": "v-1", "name": "web disk 0", "sr": "s-1", "size": 8388608,
        "path": "/h/sr/default/v-1.vhd", "snapshot_of": null, "snapshot": null,
        "cbt_enabled": false, "data_destroyed": false, "created": "2026-12-03T10:00:00+00:00"}""",
    ),
    (
        ChangedBlocks,
        """{"vdi": "v-1", "from": "v-2", "to": "v-3", "block_size": 65536, "size": 8388608,
        "cbt_valid": true, "reason": "", "bitmap": "EAA=",
        "extents": [{"offset": 196608, "length": 65536}]}""",
    ),
    (
        ChangedBlocks,
        """{"vdi": "v-1", "from": "v-2", "to": "v-3", "block_size": 65536, "size": 8388608,
        "cbt_valid": false, "reason": "changed block tracking is not enabled on this disk",
        "bitmap": null, "extents": null}""",
    ),
    (VmList, f"""{{"vms": [{VM_HALTED}]}}"""),
    (VmInfo, VM_HALTED),
    (VmInfo, VM_RUNNING),
    (VmDeleted, f"""{{"deleted": {VM_HALTED}}}"""),
    (
        SnapshotTaken,
        """{"uuid": "snap-1", "vm": "vm-1", "name": "web snapshot",
        "created": "2026-12-03T10:01:00.000001+00:00",
        "disks": [{"position": 0, "vdi": "v-1", "snapshot_vdi": "v-2", "path": "/h/sr/default/v-1.vhd",
        "size": 8388608, "cbt_enabled": true}]}""",
    ),
    (
        SnapshotTaken,
        """{"uuid": "snap-2", "vm": "vm-1", "name": "backup b2", "created": "2026-12-03T10:02:00+00:00",
        "disks": [], "online": true}""",
    ),
    (
        SnapshotList,
        """{"snapshots": [{"uuid": "snap-1", "vm": "vm-1", "name": "backup b1",
        "created": "2026-12-03T10:01:00.000001+00:00", "state": "cbt-only", "backup_id": "b1",
        "vdis": ["v-2"]}, {"uuid": "snap-3", "vm": "vm-1", "name": "before",
        "created": "2026-12-03T10:03:00+00:00", "state": "ready", "backup_id": null, "vdis": []}]}""",
    ),
    (SnapshotDeleted, """{"uuid": "snap-1", "name": "backup b1", "kept_cbt": true, "vdis": ["v-2"]}"""),
    (
        GrantList,
        """{"grants": [{"uuid": "g-1", "export_name": "Zt3q-grant-token", "vdi": "v-2",
        "backup_id": "b1", "read_only": true, "expires": "2026-12-03T22:00:00Z", "revoked": false}]}""",
    ),
    (
        SmInfo,
        """{"vdi": "v-1", "size": 8388608, "depth": 2,
        "chain": [{"path": "/h/leaf.vhd", "type": "differencing", "unique_id": "u-1", "size": 8388608,
        "block_size": 2097152, "bat_entries": 4, "allocated_blocks": 1, "block_runs": [[1, 1]],
        "parent_unique_id": "u-0"}, {"path": "/h/base.vhd", "type": "dynamic", "unique_id": "u-0",
        "size": 8388608, "block_size": 2097152, "bat_entries": 4, "allocated_blocks": 2,
        "block_runs": [[0, 2]]}], "allocated": 6291456,
        "extents": [{"offset": 0, "length": 6291456}]}""",
    ),
    (
        SmInfo,
        """{"vdi": "v-9", "size": 1048576, "depth": 1, "chain": [{"path": "/h/fixed.vhd",
        "type": "fixed", "unique_id": "u-9", "size": 1048576}], "allocated": 1048576,
        "extents": [{"offset": 0, "length": 1048576}]}""",
    ),
    (
        PreparedBackup,
        f"""{{"backup_id": "b2", "snapshot": "snap-2",
        "vm": {{"uuid": "vm-1", "name": "web", "vcpus": 2, "memory": 536870912,
        "nics": [{{"position": 0, "mac": "02:11:22:33:44:55", "network": "lan"}}],
        "disks": [{{"position": 0, "size": 8388608}}, {{"position": 1, "size": 4194304}}]}},
        "disks": [{{"position": 0, "vdi": "v-1", "snapshot_vdi": "v-4", "size": 8388608,
        "type": "incremental", "cbt_valid": true, "reason": "",
        "extents": [{{"offset": 196608, "length": 65536}}], "dirty_bitmap": "qemu:dirty-bitmap:cbt",
        "access": {ACCESS}}},
        {{"position": 1, "vdi": "v-5", "snapshot_vdi": "v-6", "size": 4194304, "type": "full",
        "cbt_valid": false, "reason": "no base backup", "extents": [], "dirty_bitmap": null,
        "access": {ACCESS}}}]}}""",
    ),
    (WriteAccess, f"""{{"vdi": "v-7", "backup_id": "restore-1", "access": {ACCESS}}}"""),
    (RemoteAccessStopped, """{"backup_id": "b1", "revoked": 2, "snapshots_reduced": ["snap-1"]}"""),
    (
        Problem,
        """{"type": "about:blank", "title": "Request failed", "status": 404,
        "detail": "no VM named or with uuid 'nope'"}""",
    ),
]


def _contains(new: object, old: object, where: str = "") -> None:
    """Every key of *old* is in *new* with the same value (lists item by item)."""
    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for key, value in old.items():
            assert key in new, f"{where}.{key} dropped"
            _contains(new[key], value, f"{where}.{key}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for index, (a, b) in enumerate(zip(new, old, strict=True)):
            _contains(a, b, f"{where}[{index}]")
    else:
        assert new == old, f"{where}: {new!r} != {old!r}"


@pytest.mark.parametrize(
    ("model", "text"), OLD_ANSWERS, ids=[f"{m.__name__}-{i}" for i, (m, _) in enumerate(OLD_ANSWERS)]
)
def test_an_old_answer_parses_and_keeps_its_keys(model: type[pydantic.BaseModel], text: str) -> None:
    old = json.loads(text)
    parsed = model.model_validate(old)
    _contains(parsed.model_dump(mode="json", by_alias=True), old, model.__name__)
