"""The fleet's nightly window: the network-namespace topology (``tests/netfleet.py``: 3
WinServer hosts, WinCenter and vmbackup's state on PostgreSQL, SeaweedFS, the workers,
each in a namespace of its own) with 1 and with 2 ``vmbackup serve`` workers over the
same 30 VMs, and a model of a site of 100 hosts, 2 000 VMs and 200 TB from the costs
measured.

For each worker count, a fresh fleet: *vms* running VMs (default 30) of one *disk-mib*
disk whose guests wrote *data-mib* MiB of random data each, spread over the hosts; a
policy over all of them, run by the workers (``--max-jobs`` *jobs* each, ``--per-host``
*per-host*): the full run, then the incremental run with nothing changed. Measured (the
runs' own records, ``vmbackup jobs --json``):

- the *window*: the run's duration, full and incremental;
- the *per-VM fixed cost*: the incremental run's VM seconds (claim, WinCenter's
  snapshot, grant and CBT, the NBD connection, the restore point, the end) – each VM
  slot's time when there is nothing to read;
- the *per-GiB cost*: the full run's VM seconds less the fixed cost, per GiB read
  (in one slot: a worker runs *jobs* slots at once).

The 2-worker ratio runs both workers on this one machine (2 cores): it measures what
sharing a run costs (claims, a second repository lock and index load, two WinCenter
clients) more than it shows the speed-up of a second machine.

The model projects a site's window from the 1-worker costs: every worker a machine of
its own like this one with *jobs* slots, every host 2 slots (``--per-host 2``), so a
night's backups take ``(VMs × fixed + GiB × per-GiB) / slots`` with ``slots = min(N ×
jobs, hosts × 2)``; printed for N = 1, 2, 4, 8, 16, 32 workers, for the incremental
night (*change* % of the 200 TB read, default 3 %) and a full one (all of it). What it
leaves out is printed with it.

    .venv/bin/python bench/fleet.py [--vms 30] [--disk-mib 64] [--data-mib 16] [--jobs 4]
        [--per-host 2] [--change 3] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netfleet import NetFleet, running_netfleet
from tests.netns import NetnsUnavailable, Topology, check_netns
from tests.sites import guest, overwrite

MiB = 1 << 20
GiB = 1 << 30
SITE_HOSTS, SITE_VMS, SITE_BYTES = 100, 2000, 200 * 10**12


def _vms(fleet: NetFleet, count: int, disk: int, data: int) -> list[str]:
    """*count* running VMs of one *disk*-byte disk whose first *data* bytes are random."""
    names = [f"vm-{i:03d}" for i in range(count)]
    for index, name in enumerate(names):
        with fleet.hosts[index % len(fleet.hosts)].client() as host:
            host.create_vm(name, [disk])
            host.start_vm(name)
            with guest(host, name, 0) as written:
                overwrite(written, bytearray(data), random.Random(index))
    with fleet.center.client() as center:
        for host in center.hosts():
            center.sync_host(host.id)
    return names


def _run(fleet: NetFleet, policy: str, vms: list[str]) -> dict[str, Any]:
    """A new policy over *vms*, due now; its run once it ended."""
    fleet.due_policy(policy, vms)
    run = fleet.wait_run(policy, timeout=3600)
    if run["state"] != "succeeded":
        raise SystemExit(f"run of {policy} {run['state']}: {run['error']}")
    return run


def measure(workers: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    with (
        Topology() as topology,
        running_netfleet(
            topology,
            root / f"fleet-{workers}",
            hosts=3,
            workers=workers,
            worker_options=[f"--max-jobs={args.jobs}", f"--per-host={args.per_host}", "--connections=4"],
        ) as fleet,
    ):
        started = time.monotonic()
        names = _vms(fleet, args.vms, args.disk_mib * MiB, args.data_mib * MiB)
        print(
            f"  {workers} worker(s): {len(names)} VMs made in {time.monotonic() - started:.0f} s", flush=True
        )
        full = _run(fleet, "full", names)
        incremental = _run(fleet, "incremental", names)
    read = sum(vm["read"] for vm in full["vms"])
    fixed = sum(vm["seconds"] for vm in incremental["vms"]) / len(incremental["vms"])
    data_seconds = sum(vm["seconds"] for vm in full["vms"]) - fixed * len(full["vms"])
    result = {
        "workers": workers,
        "full_window": float(full["seconds"]),
        "incremental_window": float(incremental["seconds"]),
        "fixed": fixed,
        "per_gib": data_seconds / (read / GiB),
        "read_gib": read / GiB,
        "shared": len({vm["worker"] for vm in full["vms"]}),
    }
    print(
        f"  {workers} worker(s): full {result['full_window']:.1f} s ({result['read_gib']:.2f} GiB read), "
        f"incremental {result['incremental_window']:.1f} s; per VM {fixed:.2f} s, per GiB "
        f"{result['per_gib']:.1f} s (one slot); VMs backed up by {result['shared']} worker(s)",
        flush=True,
    )
    return result


def model(one: dict[str, float], args: argparse.Namespace) -> list[str]:
    lines = [
        f"model: {SITE_HOSTS} hosts, {SITE_VMS} VMs, {SITE_BYTES / 10**12:.0f} TB; per VM "
        f"{one['fixed']:.2f} s, per GiB {one['per_gib']:.1f} s in one slot; {args.jobs} slots a worker, "
        f"{args.per_host} a host",
        f"| workers | slots | incremental night ({args.change:g} % read) | full (all read) |",
        "|---:|---:|---:|---:|",
    ]
    for workers in (1, 2, 4, 8, 16, 32):
        slots = min(workers * args.jobs, SITE_HOSTS * args.per_host)
        rows = []
        for share in (args.change / 100, 1.0):
            seconds = (SITE_VMS * one["fixed"] + SITE_BYTES * share / GiB * one["per_gib"]) / slots
            rows.append(f"{seconds / 3600:.1f} h")
        lines.append(f"| {workers} | {slots} | {rows[0]} | {rows[1]} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vms", type=int, default=30)
    parser.add_argument("--disk-mib", type=int, default=64)
    parser.add_argument("--data-mib", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--per-host", type=int, default=2)
    parser.add_argument("--change", type=float, default=3.0)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    try:
        check_netns()
    except NetnsUnavailable as why:
        raise SystemExit(f"bench/fleet.py needs network namespaces: {why}") from None
    counts = [int(n) for n in args.workers.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-", dir="/var/tmp") as scratch:
        for workers in counts:
            results[workers] = measure(workers, args, Path(scratch))
    if 1 in results and 2 in results:
        one, two = results[1], results[2]
        print(
            f"2 workers / 1 worker: full window {two['full_window'] / one['full_window']:.2f}x, "
            f"incremental window {two['incremental_window'] / one['incremental_window']:.2f}x, "
            f"per-VM cost {two['fixed'] / one['fixed']:.2f}x (both workers on this one machine)"
        )
    if 1 in results:
        print("\n".join(model(results[1], args)))
    print(json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
