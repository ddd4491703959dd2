"""Row: network faults between vmbackup and a host's NBD port, counted.

The real daemons on loopback (a WinServer host and a WinCenter, as the tests start
them) with the tests' TCP proxy (:mod:`tests.faultproxy`) on the data path: the host
advertises the proxy's port in access info (``winserver serve --nbd-advertised-port``).
A running VM with a 16 MiB disk of random data whose guest keeps writing during each
backup. ``vmbackup`` runs as a user runs it (``--nbd-timeout 1``). Per trial, at a random
instant (a random number of bytes into the command's NBD traffic, from the seed):

* **delay** – every chunk forwarded after 0.5 to 5 ms: the backup must succeed;
* **cut** – every open connection closed once: the backup must succeed (wddk connects
  again and reads again);
* **stall** – every open connection stops forwarding, nothing closed: the backup must
  succeed (a read unanswered for the timeout is a lost connection);
* **cuts that persist** – every connection, new ones too, cut after a few KiB: the backup
  must fail with one line and leave nothing (``list`` unchanged, no live grant,
  WinCenter's backup aborted);
* **restore cut** – a restore as a new VM through one cut: the VM must be exact;
* **restore, cuts that persist** – the restore must fail with one line and its half VM
  be removed (no VM of that name on the host or in WinCenter, no live grant).

A backup that succeeded is *exact* when its restore point, exported, is the disk at one
instant (the data written before it plus a prefix of the guest's writes during it). At
the end: ``verify --read-data`` clean, no live grant, no snapshot left ``ready``, and a
last backup without faults succeeds and is exact.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable

from .harness import Outcome, Row, Scale

__all__ = ["ROW", "run"]

NBD_TIMEOUT = "1"
_SETTLE = 60.0  # seconds WinCenter gets to abort a failed backup or restore in the background


def _settled(check: Callable[[], bool], seconds: float = _SETTLE) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def run(scale: Scale) -> Outcome:
    from tests.backup.conftest import vmbackup
    from tests.backup.netfaults import SIZE, guest_writing, live_grants, proxied_site, random_vm
    from tests.sites import configure, consistent_prefix
    from tests.sites import guest as open_guest

    trials = 1 if scale.smoke else 20  # per kind (smoke: a cut and cuts that persist, a restore cut)
    rng = random.Random(scale.seed)
    root = scale.workdir / "network-faults"
    root.mkdir(parents=True)
    counts: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    reconnects = 0

    def count(kind: str, outcome: str) -> None:
        counts.setdefault(kind, {}).setdefault(outcome, 0)
        counts[kind][outcome] += 1

    with proxied_site(root) as (site, proxy):
        env = configure(site, root, str(root / "repo"), "campaign")
        base = random_vm(site, "vm", seed=scale.seed)
        exported = 0

        def image_of(point: str) -> bytes:
            nonlocal exported
            exported += 1
            path = root / f"export-{exported}.raw"
            done = vmbackup(env, "export", point, "--disk", "0", str(path), "--json")
            if done.returncode != 0:
                raise RuntimeError(f"export failed: {done.stderr.strip()}")
            data = path.read_bytes()
            path.unlink()
            return data

        def points() -> list[str]:
            done = vmbackup(env, "list", "--json")
            return [p["id"] for p in json.loads(done.stdout)["points"]]

        def one_line(stderr: str) -> bool:
            lines = stderr.strip().splitlines()
            return len(lines) == 1 and "Traceback" not in stderr

        def backup(kind: str, arm: Callable[[], None], expect_ok: bool) -> None:
            nonlocal reconnects
            before, disk = points(), bytes(base)
            arm()
            with guest_writing(site, "vm", seed=rng.randrange(1 << 30)) as writes:
                done = vmbackup(env, "backup", "--vm", "vm", "--full", "--nbd-timeout", NBD_TIMEOUT, "--json")
            proxy.passing()
            for offset, data in writes:  # the disk now
                base[offset : offset + len(data)] = data
            if done.returncode == 0:
                [summary] = json.loads(done.stdout)["backups"]
                reconnects += int(summary.get("reconnects", 0))
                exact = consistent_prefix(disk, writes, image_of(summary["point"])) >= 0
                count(kind, "succeeded, exact" if exact else "succeeded, NOT exact")
                if not exact:
                    problems.append(
                        f"{kind}: restore point {summary['point']} is not the disk at one instant"
                    )
                elif not expect_ok:
                    problems.append(f"{kind}: succeeded although every connection was cut")
                return
            clean = one_line(done.stderr) and points() == before
            with site.host_client() as host:
                clean = clean and _settled(lambda: not live_grants(host))
            count(kind, "failed cleanly" if clean else "failed, NOT clean")
            if not clean or expect_ok:
                problems.append(f"{kind}: failed ({done.stderr.strip()[-200:]})")

        kinds: list[tuple[str, Callable[[], None], bool]] = [
            ("delay", lambda: setattr(proxy, "delay", rng.uniform(0.0005, 0.005)), True),
            ("cut", lambda: proxy.cut_at(proxy.forwarded + rng.randrange(SIZE)), True),
            ("stall", lambda: proxy.cut_at(proxy.forwarded + rng.randrange(SIZE), stall=True), True),
            ("cuts that persist", lambda: proxy.cut_each_after(rng.randrange(8, 256) * 1024), False),
        ]
        if scale.smoke:  # the harness kept working: one cut ridden out, one failure clean
            kinds = [kinds[1], kinds[3]]
        for kind, arm, expect_ok in kinds:
            for _ in range(trials):
                backup(kind, arm, expect_ok)

        point = points()[-1]
        model = image_of(point)
        restored = 0

        def restore(kind: str, arm: Callable[[], None], expect_ok: bool) -> None:
            nonlocal restored, reconnects
            restored += 1
            name = f"restored-{restored}"
            arm()
            done = vmbackup(
                env, "restore", point, "--as-new-vm", name, "--nbd-timeout", NBD_TIMEOUT, "--json"
            )
            proxy.passing()
            with site.host_client() as host, site.client() as center:
                if done.returncode == 0:
                    reconnects += int(json.loads(done.stdout).get("reconnects", 0))
                    host.start_vm(name)
                    with open_guest(host, name, 0) as guest:
                        ok = guest.read(0, SIZE) == model
                    host.stop_vm(name)
                    center.delete_vm(center.vm(name).id)
                    count(kind, "succeeded, exact" if ok else "succeeded, NOT exact")
                    if not ok or not expect_ok:
                        problems.append(f"{kind}: {name} {'not exact' if not ok else 'succeeded'}")
                    return
                clean = one_line(done.stderr) and _settled(
                    lambda: name not in {v.name for v in host.list_vms()} and not live_grants(host)
                )
                clean = clean and center.vms(name=name).items == []
                count(kind, "failed cleanly" if clean else "failed, NOT clean")
                if not clean or expect_ok:
                    problems.append(f"{kind}: failed ({done.stderr.strip()[-200:]})")

        restores: list[tuple[str, Callable[[], None], bool]] = [
            ("restore cut", lambda: proxy.cut_at(proxy.forwarded + rng.randrange(SIZE)), True),
            ("restore, cuts that persist", lambda: proxy.cut_each_after(rng.randrange(8, 256) * 1024), False),
        ]
        for kind, arm, expect_ok in restores[:1] if scale.smoke else restores:
            for _ in range(trials):
                restore(kind, arm, expect_ok)

        # afterwards: the repository, the host, and one more backup without faults
        verified = vmbackup(env, "verify", "--read-data")
        if verified.returncode != 0:
            problems.append(f"verify --read-data: {verified.stdout.strip()[-200:]}")
        with site.host_client() as host:
            if not _settled(lambda: not live_grants(host)):
                problems.append(f"live grants left: {len(live_grants(host))}")
            ready = [s for s in host.list_snapshots("vm") if s.state == "ready"]
            if ready:
                problems.append(f"{len(ready)} snapshot(s) left ready")
        backup("after", lambda: None, True)

    total = sum(sum(c.values()) for c in counts.values())
    figures = "; ".join(
        f"{kind}: " + ", ".join(f"{n} {what}" for what, n in c.items()) for kind, c in counts.items()
    )
    figures += (
        f"; {reconnects} reconnections; verify --read-data clean, 0 live grants, 0 snapshots left ready"
    )
    if problems:
        figures = figures.replace(
            "verify --read-data clean, 0 live grants, 0 snapshots left ready", "see problems"
        )
    return Outcome(
        done="backups and restores through a TCP proxy that delays, cuts and stalls the NBD connections",
        count=total,
        passed=not problems,
        figures=figures,
        problems=problems,
    )


ROW = Row(
    name="network-faults",
    title="vmbackup ↔ host through a TCP proxy that delays, stalls and cuts connections",
    checked="delay/cut/stall: backup succeeds, restore point exact; cuts that persist: one line, "
    "nothing half-saved (list unchanged, no grant, half VM removed); verify --read-data clean",
    run=run,
)
