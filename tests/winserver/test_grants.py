"""Grants: unguessable export names, read-only or writable, expiring, revocable – and the
NBD server refusing what is not granted (the real server, wddk as the client)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

import agentless.wddk as wddk
from agentless import vhd
from agentless.nbd.protocol import NBD_EPERM
from agentless.winserver.grants import GrantError, GrantExports, Grants
from agentless.winserver.host import Host
from agentless.winserver.snapshots import collect_garbage, delete_snapshot, snapshot_vm
from agentless.winserver.vms import VmError, create_vm, delete_vm, describe_vm
from tests.nbd.serving import serve

MiB = 1 << 20


class Clock:
    """The only fake: time."""

    def __init__(self) -> None:
        self.now = 1_800_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def host(tmp_path: Path) -> Host:
    made, _ = Host.init(tmp_path / "host")
    return made


def test_grant_fields_and_lifecycle(host: Host) -> None:
    """Export names are long random tokens; resolve works until expiry or revocation."""
    vm = create_vm(host, "web", [MiB])
    clock = Clock()
    grants = Grants(host.metadata, clock)
    vdi = vm.disks[0].vdi
    a = grants.grant(vdi, "backup-1", read_only=True, lifetime=datetime.timedelta(minutes=10))
    b = grants.grant(vdi, "backup-1", read_only=True)
    c = grants.grant(vdi, "restore-9", read_only=False)
    assert len({a.export_name, b.export_name, c.export_name}) == 3
    assert len(a.export_name) >= 40
    assert a.expires == "2027-01-15T08:10:00Z"
    assert grants.resolve(a.export_name) == (vm.disks[0].path, True)
    assert grants.resolve(c.export_name) == (vm.disks[0].path, False)
    assert grants.resolve("guess") is None
    clock.now += 601
    assert grants.resolve(a.export_name) is None  # expired
    assert grants.revoke_expired() == [a.export_name]
    assert sorted(grants.revoke("backup-1")) == sorted([a.export_name, b.export_name])
    assert grants.resolve(b.export_name) is None
    assert grants.resolve(c.export_name) is not None
    assert grants.revoke("backup-1")  # idempotent
    with pytest.raises(GrantError, match="no VDI"):
        grants.grant("nope", "x", read_only=True)
    with pytest.raises(GrantError, match="lifetime"):
        grants.grant(vdi, "x", read_only=True, lifetime=datetime.timedelta(0))


def test_nbd_access_through_grants(host: Host, tmp_path: Path) -> None:
    """A read-only grant on a snapshot reads the snapshot's data and refuses writes with
    EPERM; a writable grant writes; revocation drops open connections and refuses new
    ones; an expired grant is refused at the handshake."""
    vm = create_vm(host, "db", [4 * MiB])
    with vhd.Chain.open(vm.disks[0].path, writable=True) as chain:
        chain.write(0, b"snapshot data")
    snap = snapshot_vm(host, "db")
    clock = Clock()
    grants = Grants(host.metadata, clock)
    exports = GrantExports(grants)
    read = grants.grant(
        snap.disks[0].snapshot_vdi, "b1", read_only=True, lifetime=datetime.timedelta(hours=1)
    )
    write = grants.grant(vm.disks[0].vdi, "r1", read_only=False)
    with serve(exports) as served:
        exports.disconnect = lambda predicate: served.call(lambda: served.server.disconnect(predicate))
        with wddk.open(served.uri(read.export_name)) as disk:
            assert disk.read_only and disk.read(0, 13) == b"snapshot data"
            with pytest.raises(wddk.RequestError) as info:
                disk.write(0, b"x")
            assert info.value.error == NBD_EPERM
            with wddk.open(served.uri(write.export_name)) as target:
                target.write(0, b"restored")
                target.flush()
            exports.revoke("b1")
            with pytest.raises(wddk.NbdError):
                disk.read(0, 1)  # the open connection was dropped
        with pytest.raises(wddk.NegotiationError):
            wddk.open(served.uri(read.export_name))
        late = grants.grant(vm.disks[0].vdi, "b2", read_only=True, lifetime=datetime.timedelta(seconds=5))
        clock.now += 6
        with pytest.raises(wddk.NegotiationError):
            wddk.open(served.uri(late.export_name))
    exports.close()
    with vhd.Chain.open(snap.disks[0].path) as chain:
        assert chain.read(0, 13) == b"snapshot data"  # the snapshot never changed
    with vhd.Chain.open(describe_vm(host, "db").disks[0].path) as chain:
        assert chain.read(0, 13) == b"restored data"


def test_vm_with_open_access_is_not_deleted(host: Host) -> None:
    """A VM whose disk has a live grant cannot be deleted; after revocation it can (and
    the grant records go with it)."""
    vm = create_vm(host, "busy", [MiB])
    grants = Grants(host.metadata)
    grants.grant(vm.disks[0].vdi, "b9", read_only=True)
    with pytest.raises(VmError, match="remote access for backup 'b9' is open"):
        delete_vm(host, "busy")
    grants.revoke("b9")
    delete_vm(host, "busy")
    assert grants.list() == []


def test_grant_on_a_snapshot_reduced_to_cbt_metadata_is_refused(host: Host) -> None:
    """A snapshot whose data were destroyed has nothing to serve: its grant no longer
    resolves, even before it is revoked or expires."""
    create_vm(host, "r", [MiB])
    snap = snapshot_vm(host, "r")
    grants = Grants(host.metadata)
    grant = grants.grant(snap.disks[0].snapshot_vdi, "b", read_only=True)
    assert grants.resolve(grant.export_name) is not None
    delete_snapshot(host, snap.uuid, keep_cbt=True)
    assert grants.resolve(grant.export_name) is None


def test_a_grant_opened_while_the_collection_merges_its_file_away(host: Host) -> None:
    """The chains' garbage collection runs in the background, so it may merge a snapshot's
    file into its parent (and remove it) between the NBD server's lookup of a grant and the
    opening of its export: the export is looked up again and serves the same data from the
    file that now holds it."""
    vm = create_vm(host, "db", [4 * MiB])
    path = vm.disks[0].path
    with vhd.Chain.open(path, writable=True) as chain:
        chain.write(0, b"older")
    older = snapshot_vm(host, "db")
    with vhd.Chain.open(describe_vm(host, "db").disks[0].path, writable=True) as chain:
        chain.write(MiB, b"newer")
    newer = snapshot_vm(host, "db")
    delete_snapshot(host, older.uuid, keep_cbt=True, collect=False)  # merge due, not done
    grants = Grants(host.metadata)
    grant = grants.grant(newer.disks[0].snapshot_vdi, "b2", read_only=True)
    stale_path, _ = grants.resolve(grant.export_name) or ("", True)
    lookups = []
    real = grants.resolve

    def resolve(export_name: str) -> tuple[str, bool] | None:
        found = real(export_name)
        if not lookups:  # the collection runs right after the first lookup
            assert collect_garbage(host) == 1
        lookups.append(found)
        return found

    grants.resolve = resolve  # type: ignore[method-assign]
    exports = GrantExports(grants)
    with serve(exports) as served, wddk.open(served.uri(grant.export_name)) as disk:
        assert disk.read(0, 5) == b"older" and disk.read(MiB, 5) == b"newer"
    exports.close()
    assert lookups[0] == (stale_path, True) and not Path(stale_path).exists()
    assert lookups[-1] is not None and lookups[-1][0] != stale_path
