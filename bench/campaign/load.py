"""Row: many VM backups at once over several hosts through one WinCenter on PostgreSQL.

The bed (:mod:`.loadbed`): a private PostgreSQL cluster, one ``wincenter serve`` on it,
*hosts* ``winserver serve`` daemons (each its own directory and ports on loopback, all
registered in that WinCenter), *per_host* running VMs on each with one disk holding some
random data, an encrypted local repository, ``vmbackup`` configured against the center.
Every daemon runs with its access log counted (:mod:`.accesslog`). One guest writer per
host keeps writing to its VMs while backups run.

Three rounds, each starting every VM's backup at the same moment:

1. **full** – one ``vmbackup backup --vm VM --full`` process per VM, all started at once
   (as many scripts, operators or third-party products would: independent clients, each
   with its own API connection, repository lock and index to write);
2. **incremental** – after the guests wrote to every disk, the same again without
   ``--full``;
3. **policy** (not in the smoke run) – after more guest writes, one policy over ``--all``
   run by ``vmbackup serve --max-jobs N --per-host P --retries 0`` with N and P large
   enough for every VM at once: the in-process path (one WinCenter client and one
   repository shared by N threads).

Per round: backups succeeded, failed (reasons grouped), hung (killed after a bound), the
wall time from the first start to the last end, the peak RSS of a vmbackup process. For
one VM per host, the restore point exported is the disk at one instant (the data before
the round plus a prefix of the guest's writes). Afterwards: HTTP answers of WinCenter and
of each host by status (5xx listed) and WinCenter's audit of 5xx, live grants and orphan
snapshots on each host (a VM keeps one snapshot, reduced to CBT metadata), WinCenter's
tasks still queued/running/ready and backups not ended, ``verify --read-data``, the peak
RSS of every daemon.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .harness import Outcome, Row, Scale

if TYPE_CHECKING:
    from .loadbed import Round

__all__ = ["ROW", "run"]

_SETTLE = 90.0  # seconds WinCenter gets to finish releases in the background
MiB = 1 << 20


def _reason(stderr: str) -> str:
    """A failure's last line with what differs between VMs (names, ids, numbers) taken out,
    so that failures group by cause."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "(no output)"
    if "Traceback" in stderr:
        line = "TRACEBACK " + line
    line = re.sub(r"h\d+-vm\d+", "VM", line)
    line = re.sub(r"\b[0-9a-f]{8,}(-[0-9a-f]{4,})*\b", "ID", line)
    return re.sub(r"\d+(\.\d+)?", "N", line)[:160]


def _settled(check: Callable[[], list[str]], seconds: float = _SETTLE) -> list[str]:
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _round_figures(r: Round) -> str:
    parts = [f"{r.succeeded}/{len(r.results)} ok"]
    if r.failed:
        parts.append(f"{r.failed} failed")
    if r.hung:
        parts.append(f"{r.hung} hung")
    parts.append(f"{r.wall:.0f} s wall, at most {r.peak_open} open in WinCenter at once")
    if r.peak_rss:
        parts.append(f"vmbackup peak RSS {r.peak_rss // MiB} MiB")
    if r.exact is not None:
        parts.append(f"{r.exact[0]}/{r.exact[1]} sampled points exact")
    return f"{r.name}: " + ", ".join(parts)


def run(scale: Scale) -> Outcome:
    from .loadbed import Bed  # the tests' helpers: imported when the row runs

    hosts, per_host = (2, 3) if scale.smoke else (5, 10)
    size, data = (32 * MiB, 4 * MiB) if scale.smoke else (64 * MiB, 16 * MiB)
    hang = 240.0 if scale.smoke else 1800.0
    problems: list[str] = []
    rounds: list[Round] = []
    root = scale.workdir / "load"
    root.mkdir(parents=True)

    def say(line: str) -> None:
        if not scale.smoke:
            print(f"   load: {line} ({time.monotonic() - start:.0f} s)", flush=True)

    start = time.monotonic()
    with Bed(root, hosts, per_host, size, data, seed=scale.seed) as bed:
        setup = time.monotonic() - start
        say(f"{hosts} hosts, {hosts * per_host} VMs, WinCenter on PostgreSQL up")
        rounds.append(bed.processes("full", ["--full"], hang))
        say(_round_figures(rounds[-1]))
        bed.guests_write(16 if scale.smoke else 32)
        rounds.append(bed.processes("incremental", [], hang))
        say(_round_figures(rounds[-1]))
        if not scale.smoke:
            bed.guests_write(32)
            rounds.append(bed.policy("policy", hang))
            say(_round_figures(rounds[-1]))
        for r in rounds:
            reasons = collections.Counter(_reason(f.stderr) for f in r.results.values() if not f.ok)
            problems += [f"{r.name}: {n} × {reason}" for reason, n in reasons.most_common()]
            wrong = [vm for vm, f in r.results.items() if f.ok and f.type != r.expected_type(vm)]
            if wrong:
                problems.append(f"{r.name}: {len(wrong)} backup(s) not {r.name} (e.g. {wrong[0]})")
            if r.exact is not None and r.exact[0] != r.exact[1]:
                problems.append(f"{r.name}: {r.exact[1] - r.exact[0]} sampled restore point(s) NOT exact")

        # afterwards
        grants = _settled(bed.live_grants)
        snapshots = _settled(bed.orphan_snapshots)
        center_left = _settled(bed.center_open)
        problems += grants + snapshots + center_left
        checks = time.monotonic()
        verified = bed.vmbackup("verify", "--read-data")
        if verified.returncode != 0:
            problems.append(f"verify --read-data: {(verified.stdout + verified.stderr).strip()[-300:]}")
        answers = bed.answers()
        audit_5xx = bed.audit_5xx()
        rss = bed.peak_rss()
        logged = bed.logged_errors()
        checks = time.monotonic() - checks

    five = {
        who: sum(n for status, n in counts.items() if status >= 500) for who, (counts, _) in answers.items()
    }
    for who, (_counts, lines) in answers.items():
        if lines:
            shown = collections.Counter(lines).most_common(3)
            problems.append(
                f"{who}: {five[who]} HTTP 5xx (" + "; ".join(f"{n} × {line}" for line, n in shown) + ")"
            )
    if audit_5xx:
        problems.append(f"WinCenter audit: {audit_5xx} call(s) answered 5xx")
    problems += logged

    total = sum(len(r.results) for r in rounds)
    calls = {who: sum(counts.values()) for who, (counts, _) in answers.items()}
    host_calls = sum(n for who, n in calls.items() if who != "wincenter")
    figures = "; ".join(_round_figures(r) for r in rounds)
    figures += (
        f"; setup {setup:.0f} s, verify {checks:.0f} s"
        f"; {hosts} hosts × {per_host} VMs of {size // MiB} MiB ({data // MiB} MiB data); "
        f"HTTP answers: WinCenter {calls.get('wincenter', 0)} ({five.get('wincenter', 0)} 5xx), "
        f"hosts {host_calls} ({sum(n for who, n in five.items() if who != 'wincenter')} 5xx); "
        f"live grants {len(grants)}, orphan snapshots {len(snapshots)}, WinCenter open {len(center_left)}; "
        f"verify --read-data {'clean' if verified.returncode == 0 else 'FAILED'}; peak RSS: "
        + ", ".join(f"{who} {n // MiB} MiB" for who, n in rss.items())
    )
    return Outcome(
        done=f"{hosts * per_host} VM backups at once over {hosts} hosts through one WinCenter on "
        f"PostgreSQL, {len(rounds)} rounds (full, incremental{', policy' if len(rounds) > 2 else ''})",
        count=total,
        passed=not problems,
        figures=figures,
        problems=problems,
    )


ROW = Row(
    name="load",
    title="50 concurrent VM backups over 5 hosts through one WinCenter on PostgreSQL",
    checked="every backup succeeds or fails with one clear line; no HTTP 5xx (WinCenter, hosts, audit); "
    "0 live grants, 0 orphan snapshots, nothing left open in WinCenter; sampled points exact; "
    "verify --read-data clean",
    run=run,
)
