"""Fuzzing with counts: a million generated inputs per target, in batches, in-process.

A *target* is a module with::

    EXPECTED: tuple[type[BaseException], ...]   the errors its readers document
    def prepare(workdir: Path) -> State          once per worker process (templates, servers)
    def case(state: State, rng: random.Random) -> bool
        generate one input from rng, feed it to the real reader; True if the reader
        accepted it, False if it refused it with an EXPECTED error (or raise that error)

or, for targets that cannot run one input at a time (the NBD server runs many
connections at once on one event loop), ``run_shard(workdir, seed, first, count, bound)``
returning a :class:`Tally` itself.

Input *i* of a run with seed *s* comes from ``random.Random((s << 32) | i)`` alone, so
any finding is replayed from its number::

    .venv/bin/python -m bench.campaign.fuzzing bench.campaign.fuzz_vhd SEED INDEX

Per input: any exception outside EXPECTED is a **crash**; running longer than the time
bound (SIGALRM, per input) is a **hang**. Per worker process: the resident set size
after the first shard and after the last one (**bounded memory** means it did not grow
by more than :data:`RSS_GROWTH_LIMIT`), and the peak (``ru_maxrss``).

Shards of a target go to a pool of worker processes (one per core: the work is CPU
bound Python); a worker keeps its prepared state from shard to shard.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import itertools
import multiprocessing
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .harness import Outcome, Scale, format_count

__all__ = ["RSS_GROWTH_LIMIT", "Hang", "Tally", "fuzz_outcome", "replay", "run_target", "signature"]

RSS_GROWTH_LIMIT = 64 << 20
_MiB = 1 << 20
_KEEP = 20  # findings kept per tally (the counts are exact)


class Hang(BaseException):
    """One input ran past its time bound (a BaseException, so that a reader's ``except
    Exception`` does not swallow it; cleanups in ``finally`` still run)."""


@dataclasses.dataclass
class Tally:
    """What happened to a batch of inputs; tallies of shards merge into the target's."""

    inputs: int = 0
    accepted: int = 0
    refused: int = 0
    crashes: int = 0
    hangs: int = 0
    findings: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (input, what)
    slowest: float = 0.0
    slowest_index: int = -1
    rss: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)  # pid, seq, start, end
    peak_rss: int = 0
    extra: dict[str, int] = dataclasses.field(default_factory=dict)

    def crash(self, index: int, what: str) -> None:
        self.crashes += 1
        if len(self.findings) < _KEEP:
            self.findings.append((index, f"crash: {what}"))

    def hang(self, index: int, what: str = "") -> None:
        self.hangs += 1
        if len(self.findings) < _KEEP:
            self.findings.append((index, f"hang{': ' + what if what else ''}"))

    def timed(self, index: int, seconds: float) -> None:
        if seconds > self.slowest:
            self.slowest, self.slowest_index = seconds, index

    def merge(self, other: Tally) -> None:
        self.inputs += other.inputs
        self.accepted += other.accepted
        self.refused += other.refused
        self.crashes += other.crashes
        self.hangs += other.hangs
        self.findings += other.findings[: max(0, _KEEP - len(self.findings))]
        if other.slowest > self.slowest:
            self.slowest, self.slowest_index = other.slowest, other.slowest_index
        self.rss += other.rss
        self.peak_rss = max(self.peak_rss, other.peak_rss)
        for key, value in other.extra.items():
            self.extra[key] = self.extra.get(key, 0) + value

    def rss_growth(self) -> tuple[int, int, int]:
        """(largest growth of one worker from its first shard to its last, that worker's
        RSS after the first shard, after the last) in bytes."""
        by_pid: dict[int, list[tuple[int, int, int]]] = {}
        for pid, seq, start, end in self.rss:
            by_pid.setdefault(pid, []).append((seq, start, end))
        worst = (0, 0, 0)
        for shards in by_pid.values():
            shards.sort()
            warm, last = shards[0][2], shards[-1][2]
            if last - warm >= worst[0]:
                worst = (last - warm, warm, last)
        return worst


def signature(error: BaseException) -> str:
    """``Type at file:line: message`` with the innermost frame of this project."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "agentless" in f.filename] or frames
    where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else ""
    return f"{type(error).__name__}{where}: {str(error)[:160]}"


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def input_rng(seed: int, index: int) -> random.Random:
    return random.Random((seed << 32) | index)


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


# ---------------------------------------------------------------------- in a worker

_states: dict[str, Any] = {}
_shard_seq = 0


def _state(module: Any, workdir: str) -> Any:
    name = module.__name__
    if name not in _states:
        path = Path(workdir, f"{name.rsplit('.', 1)[-1]}-{os.getpid()}")
        path.mkdir(parents=True, exist_ok=True)
        _states[name] = module.prepare(path)
    return _states[name]


def _shard(module_name: str, workdir: str, seed: int, first: int, count: int, bound: float) -> Tally:
    """Run inputs [first, first + count) of *module_name* in this worker."""
    global _shard_seq
    module = importlib.import_module(module_name)
    _shard_seq += 1
    start_rss = current_rss()
    if hasattr(module, "run_shard"):
        tally: Tally = module.run_shard(Path(workdir), seed, first, count, bound)
    else:
        tally = _sync_shard(module, _state(module, workdir), seed, first, count, bound)
    tally.rss.append((os.getpid(), _shard_seq, start_rss, current_rss()))
    tally.peak_rss = peak_rss()
    return tally


def _sync_shard(module: Any, state: Any, seed: int, first: int, count: int, bound: float) -> Tally:
    tally = Tally()
    expected: tuple[type[BaseException], ...] = module.EXPECTED
    case = module.case
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for index in range(first, first + count):
            rng = input_rng(seed, index)
            began = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, bound)
            try:
                if case(state, rng):
                    tally.accepted += 1
                else:
                    tally.refused += 1
            except Hang:
                tally.hang(index)
            except expected:
                tally.refused += 1
            except Exception as error:
                tally.crash(index, signature(error))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            tally.inputs += 1
            tally.timed(index, time.perf_counter() - began)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return tally


# ---------------------------------------------------------------------- the run


def run_target(module_name: str, scale: Scale, bound: float, shards_per_job: int = 8) -> Tally:
    """Feed ``scale.inputs`` inputs to the target in ``scale.jobs`` worker processes."""
    workdir = scale.workdir / module_name.rsplit(".", 1)[-1]
    workdir.mkdir(parents=True, exist_ok=True)
    shards = max(1, min(scale.inputs, scale.jobs * shards_per_job))
    edges = [scale.inputs * i // shards for i in range(shards + 1)]
    total = Tally()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(scale.jobs, mp_context=context) as pool:
        futures = [
            pool.submit(_shard, module_name, str(workdir), scale.seed, lo, hi - lo, bound)
            for lo, hi in itertools.pairwise(edges)
            if hi > lo
        ]
        for future in concurrent.futures.as_completed(futures):
            total.merge(future.result())
            if not scale.smoke:
                print(
                    f"   {module_name.rsplit('.', 1)[-1]}: {format_count(total.inputs)} inputs, "
                    f"{total.crashes} crashes, {total.hangs} hangs",
                    flush=True,
                )
    return total


def fuzz_outcome(
    tally: Tally, what: str, scale: Scale, bound: float, module_name: str, accepted: str
) -> Outcome:
    """The Outcome of a fuzz row: passed when every input ran, without crash or hang, and
    no worker grew by more than RSS_GROWTH_LIMIT. *accepted* says what the share of
    accepted inputs means (how deep the inputs got)."""
    growth, warm, last = tally.rss_growth()
    share = 100 * tally.accepted / tally.inputs if tally.inputs else 0.0
    extra = "".join(f", {format_count(v)} {k}" for k, v in sorted(tally.extra.items()))
    figures = (
        f"{tally.crashes} crashes, {tally.hangs} hangs (bound {bound:g} s/input, slowest "
        f"{tally.slowest * 1000:.0f} ms); {share:.1f} % {accepted}{extra}; RSS per worker "
        f"{warm / _MiB:.0f} → {last / _MiB:.0f} MiB, peak {tally.peak_rss / _MiB:.0f} MiB"
    )
    problems = [
        f"input {index}: {what} (replay: .venv/bin/python -m bench.campaign.fuzzing {module_name} "
        f"{scale.seed} {index})"
        for index, what in tally.findings
    ]
    if growth > RSS_GROWTH_LIMIT:
        problems.append(f"a worker's RSS grew by {growth / _MiB:.0f} MiB")
    if tally.inputs != scale.inputs:
        problems.append(f"{tally.inputs} of {scale.inputs} inputs ran")
    passed = not problems
    return Outcome(what, tally.inputs, passed, figures, problems)


def replay(module_name: str, seed: int, index: int) -> None:
    """Run one input again in this process, with its traceback if it fails."""
    module = importlib.import_module(module_name)
    with tempfile.TemporaryDirectory(prefix="campaign-replay-") as workdir:
        if hasattr(module, "run_shard"):
            tally = module.run_shard(Path(workdir), seed, index, 1, 30.0, verbose=True)
            print(tally)
            return
        state = _state(module, workdir)
        try:
            accepted = module.case(state, input_rng(seed, index))
        except module.EXPECTED as error:
            print(f"refused (documented): {signature(error)}")
            return
        print("accepted" if accepted else "refused")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m bench.campaign.fuzzing MODULE SEED INDEX")
    replay(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
