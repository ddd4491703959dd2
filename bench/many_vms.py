"""Many small VMs: the fixed cost per VM of ``vmbackup backup --all`` and of a policy run,
and WinCenter's inventory sync and ``GET /api/v1/vms`` at 100 and 1 000 VMs.

Real daemons on loopback (``tests/fleet.py``): *hosts* WinServer hosts behind one
WinCenter (SQLite), the ``vmbackup`` command as a user runs it.

Backups. *small* VMs (default 20), then *vms* VMs (default 200), each of one
*disk-mib* disk whose guest wrote *data-mib* of random data, spread over the hosts:

- ``backup --all`` (``--parallel`` *parallel*) of the *small* VMs, and of all *vms*, each
  into a fresh repository (full backups), then again (incrementals, nothing changed);
- the data time at the same size: one VM whose disk holds as much data as all the VMs of
  the run together, backed up alone (``--vm``, full), into a fresh repository;
- fixed cost per VM = (time of the run - data time at its size) / VMs, in ms; printed for
  *small* and *vms* VMs with their ratio (1.0: the per-VM cost does not grow with the
  number of VMs); and the cost of each VM past the first *small*: the difference of the
  two runs less the difference of their data times, over the VMs added (what a process's
  start, the repository's opening and its lock cost once is left out);
- a policy over every VM (``vmbackup policy create --all``): ``run-now``, and a run of
  ``vmbackup serve`` (a per-minute schedule; its run's recorded duration).

Inventory. Another fleet of *hosts* hosts: VMs of 1 MiB made on the hosts, 100 then
*inventory* (default 1 000): a sync of every host (``POST /hosts/{id}/sync``: the first,
which learns the new VMs, and one that finds nothing changed), the whole list read with
``every_vm`` (pages of 1 000 and of 100), and one page of 100; times at both sizes and
their ratio (10: linear in the VMs).

    .venv/bin/python bench/many_vms.py [--vms 200] [--small 20] [--hosts 4]
        [--inventory 1000] [--skip-backups] [--skip-inventory]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentless.backup.center import every_vm
from tests.backup.conftest import vmbackup
from tests.fleet import Fleet, running_fleet
from tests.sites import configure, guest

MiB = 1 << 20


def _ok(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    if done.returncode != 0:
        raise SystemExit(f"vmbackup failed ({done.returncode}): {done.stderr[-2000:]}")
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def _timed(env: dict[str, str], *args: str) -> tuple[float, dict[str, Any]]:
    """Wall time of one ``vmbackup`` command (the process included), and its document."""
    started = time.monotonic()
    document = _ok(vmbackup(env, *args, "--json", timeout=3600))
    return time.monotonic() - started, document


def _fill(fleet: Fleet, names: list[str], data: int) -> None:
    """Start each VM, have its guest write *data* random bytes from offset 0, stop it
    (the hosts in parallel)."""
    wanted = set(names)

    def fill(index: int) -> None:
        with fleet.host_client(index) as host:
            for name in [vm["name"] for vm in host.list_vms() if vm["name"] in wanted]:
                host.start_vm(name)
                with guest(host, name, 0) as disk:
                    disk.write(0, os.urandom(data))
                    disk.flush()
                host.stop_vm(name)

    with concurrent.futures.ThreadPoolExecutor(len(fleet.hosts)) as pool:
        for done in [pool.submit(fill, i) for i in range(len(fleet.hosts))]:
            done.result()


def _new_repo(env: dict[str, str], path: Path) -> dict[str, str]:
    _ok(vmbackup(env, "init", str(path), "--json"))
    return env | {"VMBACKUP_REPO": str(path)}


def _data_time(fleet: Fleet, env: dict[str, str], root: Path, name: str, data: int) -> float:
    """Seconds of a full backup of one VM holding *data* bytes (the disk *data* + 1 MiB)."""
    with fleet.host_client(0) as host:
        host.create_vm(name, [data + MiB])
    _fill(fleet, [name], data)
    fleet.sync()
    seconds, _ = _timed(_new_repo(env, root / f"repo-{name}"), "backup", "--vm", name, "--full")
    return seconds


def _backups(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    data, disk = args.data_mib * MiB, args.disk_mib * MiB
    figures: dict[str, Any] = {}
    with running_fleet(root / "fleet", args.hosts) as fleet:
        env = configure(fleet, root, str(root / "repo-init"))  # type: ignore[arg-type]
        runs: dict[int, dict[str, float]] = {}
        made = 0
        for count in (args.small, args.vms):
            names = fleet.make_vms(count - made, disk, start=made)
            _fill(fleet, names, data)
            made = count
            fleet.sync()
            repo = _new_repo(env, root / f"repo-all-{count}")
            full, document = _timed(repo, "backup", "--all", "--parallel", str(args.parallel))
            assert len(document["backups"]) == count and not document["failed"], document["failed"]
            again, document = _timed(repo, "backup", "--all", "--parallel", str(args.parallel))
            assert {b["type"] for b in document["backups"]} == {"incremental"}
            runs[count] = {"full": full, "incremental": again}
            print(f"backup --all of {count} VMs: full {full:.1f} s, incremental {again:.1f} s", flush=True)
        # the data time at each run's size: one VM holding all the run's data
        for count in (args.small, args.vms):
            runs[count]["data"] = _data_time(fleet, env, root, f"data-{count}", count * data)
            print(f"one VM of {count} x {args.data_mib} MiB: {runs[count]['data']:.1f} s", flush=True)
        with fleet.client() as center:  # the data VMs go: the policy backs up the same VMs
            for count in (args.small, args.vms):
                center.delete_vm(f"data-{count}")
        for count, run in runs.items():
            run["fixed_ms"] = (run["full"] - run["data"]) / count * 1000
            run["incremental_ms"] = run["incremental"] / count * 1000
        figures["backup_all"] = runs

        policy_env = _new_repo(env, root / "repo-policy") | {
            "VMBACKUP_DATABASE": f"sqlite:///{root}/state.db"
        }
        repo = policy_env["VMBACKUP_REPO"]
        _ok(vmbackup(policy_env, "policy", "create", "every", "--all", "--schedule", "0 3 * * *", "--json"))
        first, document = _timed(policy_env, "run-now", "every")
        assert document["state"] == "succeeded", document.get("error")
        again, document = _timed(policy_env, "run-now", "every")
        print(f"run-now of {args.vms} VMs: full {first:.1f} s, incremental {again:.1f} s", flush=True)
        figures["run_now"] = {"full": first, "incremental": again, "vms": len(document["vms"])}

        _ok(
            vmbackup(
                policy_env,
                "policy",
                "create",
                "minutely",
                "--all",
                "--schedule",
                "* * * * *",
                "--repo",
                repo,
                "--json",
            )
        )
        log = open(root / "serve.log", "w")  # noqa: SIM115 - closed with the process
        serve = subprocess.Popen(
            [sys.executable, "-m", "agentless.backup.cli", "serve", "--listen", "127.0.0.1:0", "--tick", "1"],
            env=policy_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                runs_now = _ok(vmbackup(policy_env, "jobs", "--policy", "minutely", "--json"))["runs"]
                ended = [r for r in runs_now if r["state"] != "running"]
                if ended:
                    break
                time.sleep(2)
            else:
                raise SystemExit("vmbackup serve ran no policy run within an hour")
        finally:
            serve.terminate()
            serve.wait(120)
            log.close()
        run = ended[0]
        assert run["state"] == "succeeded", run.get("error")
        print(f"serve: a run of {len(run['vms'])} VMs took {run['seconds']:.1f} s", flush=True)
        figures["serve"] = {"seconds": run["seconds"], "vms": len(run["vms"])}
    return figures


def _inventory(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    figures: dict[int, dict[str, float]] = {}
    with running_fleet(root / "inventory", args.hosts) as fleet, fleet.client() as center:
        hosts = center.hosts()
        made = 0
        for count in (100, args.inventory):
            fleet.make_vms(count - made, MiB, prefix="inv", start=made)
            made = count
            row: dict[str, float] = {}
            for what in ("sync_new", "sync_same"):
                started = time.monotonic()
                for host in hosts:
                    center.sync_host(host.id)
                row[what] = time.monotonic() - started
            for page in (1000, 100):
                started = time.monotonic()
                listed = every_vm(center, page=page)
                row[f"list_{page}"] = time.monotonic() - started
                assert len(listed) == count, (len(listed), count)
            started = time.monotonic()
            for _ in range(10):
                center.vms(limit=100, offset=count - 100)
            row["page_100"] = (time.monotonic() - started) / 10
            figures[count] = row
            print(f"{count} VMs: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in row.items()), flush=True)
    return {"inventory": figures}


def _report(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    """The tables: each figure at the small and the large size, and their ratio."""
    if "inventory" in figures:
        small, big = figures["inventory"][100], figures["inventory"][args.inventory]
        print(f"WinCenter inventory, {args.hosts} hosts   100 VMs   {args.inventory} VMs   ratio")
        for key in small:
            ratio = big[key] / small[key]
            print(f"  {key:<28} {small[key] * 1000:7.0f} ms {big[key] * 1000:8.0f} ms  {ratio:5.1f}x")
    if "backup_all" in figures:
        runs = figures["backup_all"]
        small, big = runs[args.small], runs[args.vms]
        each = f"{args.disk_mib} MiB disks, {args.data_mib} MiB written each"
        print(f"backup --all ({each}, --parallel {args.parallel})")
        print(f"  {'':<28} {args.small:>4} VMs   {args.vms:>4} VMs   ratio")
        for key in ("full", "data", "incremental", "fixed_ms", "incremental_ms"):
            unit = "ms" if key.endswith("_ms") else "s"
            ratio = big[key] / small[key] if small[key] else float("nan")
            print(f"  {key:<28} {small[key]:7.1f} {unit:<2} {big[key]:7.1f} {unit:<2} {ratio:5.2f}x")
        extra = args.vms - args.small  # what the larger run adds, net of what both share (start, lock)
        marginal = ((big["full"] - small["full"]) - (big["data"] - small["data"])) / extra * 1000
        marginal_incremental = (big["incremental"] - small["incremental"]) / extra * 1000
        print(
            f"  each VM past the first {args.small}: {marginal:.0f} ms fixed (full, less its data time), "
            f"{marginal_incremental:.0f} ms (incremental, nothing changed)"
        )
        run_now, serve = figures["run_now"], figures["serve"]
        per_vm = {k: run_now[k] / args.vms * 1000 for k in ("full", "incremental")}
        fixed = (run_now["full"] - big["data"]) / args.vms * 1000
        print(
            f"policy over {args.vms} VMs: run-now full {run_now['full']:.1f} s ({per_vm['full']:.0f} ms "
            f"per VM, {fixed:.0f} ms fixed), incremental {run_now['incremental']:.1f} s "
            f"({per_vm['incremental']:.0f} ms per VM)"
        )
        print(
            f"serve: a run of {serve['vms']} VMs in {serve['seconds']:.1f} s "
            f"({serve['seconds'] / serve['vms'] * 1000:.0f} ms per VM)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--small", type=int, default=20, help="the smaller run (default 20 VMs)")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--disk-mib", type=int, default=4, help="each VM's disk (default 4 MiB)")
    parser.add_argument("--data-mib", type=int, default=1, help="data its guest wrote (default 1 MiB)")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--inventory", type=int, default=1000)
    parser.add_argument("--skip-backups", action="store_true")
    parser.add_argument("--skip-inventory", action="store_true")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="many-vms-") as tmp:
        root = Path(tmp)
        if not args.skip_inventory:
            figures |= _inventory(args, root)
        if not args.skip_backups:
            figures |= _backups(args, root)
    print()
    _report(args, figures)
    print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()
