"""One lock per VM (:mod:`agentless.winserver.locks`): a merge of one VM's chains does not
stall another VM's calls or the read-only routes; two calls on the same VM still run one
after the other. The API runs in-process (the daemon's app over a real event loop), so the
merge can be held mid-way by a hook; every assertion is about order, none about time."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agentless import vhd
from agentless.winserver.api import make_app
from agentless.winserver.grants import Grants
from agentless.winserver.host import Host
from agentless.winserver.locks import Locks
from agentless.winserver.runtime import Runtime
from agentless.winserver.vms import create_vm
from tests.helpers import wait_until

MiB = 1 << 20
TOKEN = "local-test-token"


class _RecordingLocks(Locks):
    """Locks that say when a thread starts waiting for a VM's lock."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[str, threading.Event] = {}

    @contextlib.contextmanager
    def vm(self, vm_uuid: str | None) -> Iterator[None]:
        if vm_uuid is not None:
            self.waiting.setdefault(vm_uuid, threading.Event()).set()
        with super().vm(vm_uuid):
            yield


class _HeldMerge:
    """vhd.coalesce held at its start until :attr:`release` is set; :attr:`order` records
    when each merge ended."""

    def __init__(self, real: Callable[..., object], order: list[str]) -> None:
        self.real = real
        self.order = order
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.started.set()
        if not self.release.wait(30):  # a call that waited for this merge: the test fails
            self.order.append("merge abandoned")
            raise TimeoutError("the test never released the merge")
        result = self.real(*args, **kwargs)
        self.order.append("merge done")
        return result


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The daemon's event loop, in a thread of its own."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(10)
    running.close()


def _two_vms(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> tuple[Host, TestClient, _RecordingLocks]:
    host, _ = Host.init(tmp_path / "host")
    a = create_vm(host, "a", [64 * MiB])
    create_vm(host, "b", [8 * MiB])
    with vhd.Chain.open(a.disks[0].path, writable=True) as chain:  # a large chain to merge
        for offset in range(0, 64 * MiB, 4 * MiB):
            chain.write(offset, bytes([offset // MiB + 1]) * (2 * MiB))
    locks = _RecordingLocks()
    app = make_app(host, Grants(host.metadata), Runtime(host, locks), loop, local_token=TOKEN)
    client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    return host, client, locks


def test_a_merge_of_one_vm_stalls_neither_another_vm_nor_the_reads(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While VM a's chain is being merged (held mid-way, a's lock held), VM b's
    prepare-backup and every read-only route answer; a's merge ends only after them."""
    order: list[str] = []
    held = _HeldMerge(vhd.coalesce, order)
    monkeypatch.setattr(vhd, "coalesce", held)
    host, api, _locks = _two_vms(tmp_path, loop)
    with host, api:
        snapshot = api.post("/api/v1/vms/a/snapshots").json()
        assert api.delete(f"/api/v1/snapshots/{snapshot['uuid']}").status_code == 200
        assert held.started.wait(30), "the background merge never started"
        try:
            assert api.get("/api/v1/host").json()["garbage_pending"] is True
            for path in ("/vms", "/vdis", "/srs", "/snapshots", "/grants", "/vms/a", "/vms/b"):
                assert api.get(f"/api/v1{path}").status_code == 200, path
            prepared = api.post("/api/v1/prepare-backup", json={"vm": "b", "backup_id": "b1", "type": "full"})
            assert prepared.status_code == 200, prepared.text
            order.append("b prepared")
            stopped = api.post(
                "/api/v1/stop-remote-access", json={"backup_id": "b1", "delete_snapshot": True}
            )
            assert stopped.status_code == 200, stopped.text
            order.append("b stopped")
            assert order == ["b prepared", "b stopped"], order  # a's merge still held
        finally:
            held.release.set()
        wait_until(lambda: not api.get("/api/v1/host").json()["garbage_pending"], 60, "the merges")
        assert order[:3] == ["b prepared", "b stopped", "merge done"], order
        assert len(vhd.Chain.open(api.get("/api/v1/vms/a").json()["disks"][0]["path"]).paths) == 1


def test_two_calls_on_one_vm_are_serialised(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot of VM a asked while a's merge runs waits for the merge: it ends after it."""
    order: list[str] = []
    held = _HeldMerge(vhd.coalesce, order)
    monkeypatch.setattr(vhd, "coalesce", held)
    host, api, locks = _two_vms(tmp_path, loop)
    with host, api:
        a_uuid = api.get("/api/v1/vms/a").json()["uuid"]
        snapshot = api.post("/api/v1/vms/a/snapshots").json()
        api.delete(f"/api/v1/snapshots/{snapshot['uuid']}")
        assert held.started.wait(30), "the background merge never started"
        locks.waiting.pop(a_uuid, None)  # from here: the next caller of a's lock
        answers: list[int] = []

        def snapshot_a() -> None:
            answers.append(api.post("/api/v1/vms/a/snapshots").status_code)
            order.append("snapshot done")

        caller = threading.Thread(target=snapshot_a)
        caller.start()
        assert locks.waiting.setdefault(a_uuid, threading.Event()).wait(30), "the snapshot never asked"
        held.release.set()
        caller.join(60)
        assert answers == [201]
        assert order == ["merge done", "snapshot done"], order
