"""Big disks: a VM of 8 sparse 2040 GiB disks (16 TiB; 2040 GiB is the VHD format's
limit for one disk) with 1 GiB written, backed up full then incrementally and restored
as a new VM – the real daemons on loopback, ``vmbackup`` as a user runs it.

    .venv/bin/python bench/big_disks.py                        # 8 x 2040 GiB, 1 GiB written
    .venv/bin/python bench/big_disks.py --disks 1 --written 64 # a quick look

Printed, per step: the peak RSS of the ``vmbackup`` process (its own VmHWM:
tests/peakrss.py) and what it read or wrote; for the restore, the bytes it wrote against
the bytes the guest wrote (a ratio: 1.0 is every written chunk and nothing else), and the
restored VHD files' allocated size on the host against the data written (holes are not
written: the restored disks hold the data, a sector bitmap per 2 MiB block and the BAT); and the
peak RSS (VmHWM) of the host's and WinCenter's daemons over the whole run.

The guest writes in runs of ``--run`` KiB at random offsets, each in an index page of
its own where it can (one page: 4096 chunks, 256 MiB of disk): the most index pages a
backup can touch for the data written, which is what held a backup's memory before
pages were written out as the backup went.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.peakrss import run_measured
from tests.sites import Site, configure, guest, running_site

MiB, GiB = 1 << 20, 1 << 30
DISK = 2040 * GiB
PAGE_SPAN = 4096 * 65536  # the disk one index page covers


def run_vmbackup(env: dict[str, str], *args: str) -> tuple[dict[str, Any], int]:
    """Run ``vmbackup ARGS --json`` to the end; (its JSON answer, its own peak RSS in bytes)."""
    done, peak = run_measured("agentless.backup.cli", [*args, "--json"], env)
    if done.returncode != 0:
        raise SystemExit(f"vmbackup {' '.join(args)} failed: {done.stderr}")
    return json.loads(done.stdout), peak


def write_spread(site: Site, vm: str, disks: int, total: int, run: int, rng: random.Random) -> int:
    """*total* bytes in runs of *run* bytes at random offsets of the VM's *disks* disks,
    each run in an index page not written before when there are enough; bytes written."""
    written = 0
    with site.host_client() as host:
        for position in range(disks):
            share = total // disks
            pages = rng.sample(range(DISK // PAGE_SPAN), min(DISK // PAGE_SPAN, share // run))
            with guest(host, vm, position) as disk:
                for n in range(share // run):
                    page = pages[n % len(pages)]
                    offset = page * PAGE_SPAN + rng.randrange(0, PAGE_SPAN - run, 65536)
                    disk.write(offset, rng.randbytes(run))
                    written += run
                disk.flush()
    return written


def vhd_bytes(site: Site, vm: str) -> int:
    """Bytes the VM's VHD files take on the host's file system (allocated, not apparent)."""
    with site.host_client() as host:
        return sum(os.stat(d.path).st_blocks * 512 for d in host.vm(vm).disks)


def peak_rss(pid: int) -> int:
    """The peak RSS (VmHWM) of the running process *pid*, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disks", type=int, default=8)
    parser.add_argument(
        "--written", type=int, default=1024, help="MiB the guest writes before the full backup"
    )
    parser.add_argument("--more", type=int, default=64, help="MiB written before the incremental")
    parser.add_argument("--run", type=int, default=256, help="KiB per guest write")
    args = parser.parse_args()
    rng = random.Random(14)
    with tempfile.TemporaryDirectory(prefix="big-disks-") as d, running_site(Path(d)) as site:
        root = Path(d)
        env = configure(site, root, str(root / "repo"))
        with site.host_client() as host:
            host.create_vm("big", [DISK] * args.disks)
            host.start_vm("big")
        started = time.monotonic()
        written = write_spread(site, "big", args.disks, args.written * MiB, args.run << 10, rng)
        print(
            f"{args.disks} x 2040 GiB, {written / MiB:.0f} MiB written in {args.run} KiB runs "
            f"({time.monotonic() - started:.0f} s); source VHDs {vhd_bytes(site, 'big') / MiB:.0f} MiB"
        )
        full, full_rss = run_vmbackup(env, "backup", "--vm", "big")
        [f] = full["backups"]
        print(
            f"full:        peak RSS {full_rss / MiB:6.0f} MiB, "
            f"read {f['read'] / MiB:.0f} MiB, {f['seconds']} s"
        )
        more = write_spread(site, "big", args.disks, args.more * MiB, args.run << 10, rng)
        written += more
        incremental, incremental_rss = run_vmbackup(env, "backup", "--vm", "big")
        [i] = incremental["backups"]
        print(
            f"incremental: peak RSS {incremental_rss / MiB:6.0f} MiB, read {i['read'] / MiB:.0f} MiB "
            f"({more / MiB:.0f} MiB written since), {i['seconds']} s"
        )
        with site.host_client() as host:
            host.stop_vm("big")
        restored, restore_rss = run_vmbackup(env, "restore", i["point"], "--as-new-vm", "big-restored")
        wrote = restored["written"]
        target = vhd_bytes(site, "big-restored")
        print(
            f"restore:     peak RSS {restore_rss / MiB:6.0f} MiB, wrote {wrote / MiB:.0f} MiB = "
            f"{wrote / written:.2f} x the {written / MiB:.0f} MiB written, {restored['seconds']} s"
        )
        print(
            f"restored VHDs on the host: {target / MiB:.0f} MiB = {target / written:.2f} x the data written "
            f"(of {args.disks * DISK / GiB:.0f} GiB of disks)"
        )
        print(
            f"daemons' peak RSS: winserver serve {peak_rss(site.host_proc.pid) / MiB:.0f} MiB, "
            f"wincenter serve {peak_rss(site.center.proc.pid) / MiB:.0f} MiB"
        )


if __name__ == "__main__":
    main()
