"""Whether the backup console's restore-point pages stay fast as the repository's points
grow: the VMs' pages and ``/points`` with a small catalog and with a large one.

A repository in a temporary directory gets first *small* restore points (default 1 000),
then *large* (default 100 000), spread over *vms* VMs (default 500). They are synthetic:
their summaries are written straight into the repository's local catalog (what a sync
would store after reading them) and each gets an empty ``points/<id>`` object, so that
the catalog's sync lists them all and finds nothing to read. The console's app
(``make_console_app``, signed in, through Starlette's test client – no TLS or network in
the figures; WinCenter is a stub listing the VMs) is asked once per size to sync, then
for each page *repeat* times; printed: the median of each page at both sizes and their
ratio, and what the one sync (a listing of every ``points/`` name) took. A ratio near 1
says the page reads what it shows, not every restore point.

    .venv/bin/python bench/console_points_scale.py [--vms 500] [--small 1000]
        [--large 100000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient

from agentless.backup.console import make_console_app
from agentless.backup.consolesite import ConsoleSite
from agentless.backup.points import PointSummary, PointVm
from agentless.backup.repository import Repository
from agentless.console import Identity, SessionStore
from bench.console_scale import page_medians
from tests.backup.building import point_record

PAGES = ["/vms", "/vms/id-vm-7", "/points", "/points?vm=vm-7", "/points?page=9"]
ADMIN = Identity("bench", "admin", frozenset({"read", "operate", "admin"}))


class _Center:
    """WinCenter's VM list, as the VMs' pages ask it: *vms* VMs named ``vm-N``."""

    def __init__(self, vms: int):
        self.all = [
            types.SimpleNamespace(
                id=f"id-vm-{n}",
                name=f"vm-{n}",
                host="host-1",
                power_state="running",
                disks=[],
                nics=[],
                vcpus=2,
                memory=1 << 30,
            )
            for n in range(vms)
        ]

    def vms(self, name: str | None = None, limit: int = 50, offset: int = 0) -> Any:
        return types.SimpleNamespace(items=self.all[offset : offset + limit], total=len(self.all))

    def vm(self, ref: str) -> Any:
        return next(vm for vm in self.all if ref in (vm.id, vm.name))


def _fill(
    repository: Repository, where: str, template: PointSummary, vms: int, start: int, count: int
) -> None:
    """Points *start*… *start + count* − 1, one a minute, VM by VM in turn: their rows
    stored in the catalog as a sync stores them, their names written empty."""
    catalog = repository.catalog()
    who = [PointVm(id=f"id-vm-{n}", name=f"vm-{n}", uuid=f"uuid-{n}", host="host-1") for n in range(vms)]
    names = Path(where) / "points"
    names.mkdir(exist_ok=True)
    fresh = {}
    for number in range(start, start + count):
        point_id = f"{number:016x}"
        stamp = f"2026-{1 + number // 43200 % 12:02d}-{1 + number // 1440 % 30:02d}T"  # minute *number*
        stamp += f"{number // 60 % 24:02d}:{number % 60:02d}:00.000000Z"
        fresh[point_id] = template.model_copy(update={"id": point_id, "time": stamp, "vm": who[number % vms]})
        (names / point_id).touch()
    catalog._store(fresh, [])


@contextlib.contextmanager
def _center(center: _Center) -> Iterator[_Center]:
    yield center


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=500)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmbackup-bench-") as scratch:
        os.environ["XDG_CACHE_HOME"] = str(Path(scratch) / "cache")
        where = str(Path(scratch) / "repo")
        center = _Center(args.vms)
        clock = types.SimpleNamespace(now=0.0)
        state = types.SimpleNamespace(policies=list)
        daemon = types.SimpleNamespace(scheduler=types.SimpleNamespace(state=state))
        site = ConsoleSite(
            daemon,  # type: ignore[arg-type]
            lambda: _center(center),  # type: ignore[arg-type,return-value]
            None,
            where,
            lambda line: None,
            clock=lambda: clock.now,
        )
        app = make_console_app(site, SessionStore(lambda token: ADMIN if token == "t" else None))
        figures, syncs = [], []
        with (
            Repository.init(where, None) as repository,
            TestClient(app, base_url="https://c.bench") as client,
        ):
            template = point_record("template", 1).summary()
            assert client.post("/login", data={"token": "t"}, follow_redirects=False).status_code == 303
            filled = 0
            for size in (args.small, args.large):
                _fill(repository, where, template, args.vms, filled, size - filled)
                filled = size
                clock.now += 3600  # the minute is over: the next view syncs
                started = time.perf_counter()
                assert client.get("/points").status_code == 200
                syncs.append(time.perf_counter() - started)
                figures.append(page_medians(client, {page: page for page in PAGES}, args.repeat))
    print(f"{args.vms} VMs; restore points: {args.small} vs {args.large}; median of {args.repeat}")
    print(f"{'page':<16} {'small ms':>9} {'large ms':>9} {'ratio':>6}")
    for page in PAGES:
        small, large = figures[0][page] * 1000, figures[1][page] * 1000
        print(f"{page:<16} {small:9.1f} {large:9.1f} {large / small:6.2f}")
    print(f"{'/points + sync':<16} {syncs[0] * 1000:9.1f} {syncs[1] * 1000:9.1f} {syncs[1] / syncs[0]:6.2f}")


if __name__ == "__main__":
    main()
