"""A ``vmbackup`` command run as a child to its end, with its peak RSS – the child's own.

The peak is the child's VmHWM, read by the child itself as it exits (an ``atexit`` hook of
a small wrapper that then runs the command's module). wait4's ``ru_maxrss`` is not used: it
counts the pages the child had as a fork of its parent before exec, so a test or bench
process holding 500 MiB would report every command it runs at 500 MiB or more. Used by the
memory tests (tests/backup/test_backupjob.py) and the benchmarks (bench/big_disks.py).

:func:`rss_file` is this process's file-backed resident memory now (mapped files whose
pages it holds: the memory tests of the index cache and the marking spill).
"""

from __future__ import annotations

import subprocess
import sys

__all__ = ["rss_file", "run_measured"]

_MARK = "peak-rss-kib"
_WRAPPER = (
    "import atexit, runpy, sys\n"
    "def peak():\n"
    "    status = open('/proc/self/status').read()\n"
    f"    print('{_MARK}', status.split('VmHWM:')[1].split()[0], file=sys.stderr, flush=True)\n"
    "atexit.register(peak)\n"
    "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__')\n"
)


def run_measured(
    module: str, args: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``python -m MODULE ARGS`` to its end (stdin empty); the finished process (its
    stderr without the peak line) and its peak RSS in bytes (0 if it died before saying)."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, module, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    lines = done.stderr.splitlines(keepends=True)
    peaks = [int(line.split()[1]) for line in lines if line.startswith(f"{_MARK} ")]
    done.stderr = "".join(line for line in lines if not line.startswith(f"{_MARK} "))
    return done, (peaks[-1] * 1024 if peaks else 0)


def rss_file() -> int:
    """Bytes of mapped files resident in this process (``RssFile`` of /proc/self/status)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("RssFile:"))
