"""Run a command under what the systemd units of ``deploy/systemd/`` restrict, without a
systemd manager: the ``SystemCallFilter=`` allow list (groups expanded by
``systemd-analyze syscall-filter``, every other call failing with ``EPERM`` as
``SystemCallErrorNumber=EPERM`` makes it) and ``MemoryDenyWriteExecute=`` (as
``prctl(PR_SET_MDWE)``, Linux 6.3). Both are inherited by every process the command
starts, so a test run under it runs the daemons it starts under them too
(docs/deployment.md, "The units")::

    apt-get install python3-seccomp     # libseccomp's binding, for the system's Python 3.11
    .venv/bin/python bench/unit_sandbox.py [--no-mdwe] [--allow '@system-service'] \\
        [--deny '@privileged @resources'] -- .venv/bin/python -m pytest -q tests/wincenter/test_flows.py

The binding is looked for in the system's ``dist-packages`` when the virtualenv lacks it.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import os
import subprocess
import sys
from typing import Any

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
SYSTEM_PACKAGES = "/usr/lib/python3/dist-packages"


@functools.cache
def expand(name: str) -> frozenset[str]:
    """The system calls of a ``@group`` (nested groups expanded), or *name* itself."""
    if not name.startswith("@"):
        return frozenset([name])
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            calls |= expand(word)
    return frozenset(calls)


def seccomp_module() -> Any:
    try:
        import seccomp  # type: ignore[import-not-found]
    except ImportError:
        sys.path.append(SYSTEM_PACKAGES)
        try:
            import seccomp
        except ImportError:
            sys.exit("unit_sandbox: no seccomp binding (Debian: apt-get install python3-seccomp)")
    return seccomp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow", default="@system-service", help="groups or calls allowed")
    parser.add_argument("--deny", default="@privileged @resources", help="taken out of --allow")
    parser.add_argument("--no-mdwe", action="store_true", help="leave writable+executable memory allowed")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    seccomp = seccomp_module()
    calls = set().union(*map(expand, args.allow.split())) - set().union(*map(expand, args.deny.split()))
    sandbox = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    allowed = 0
    for call in sorted(calls):
        try:
            sandbox.add_rule(seccomp.ALLOW, call)
            allowed += 1
        except (RuntimeError, ValueError):
            pass  # not a system call of this architecture (arm_fadvise64_64...)
    if not args.no_mdwe:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            reason = os.strerror(ctypes.get_errno())
            sys.exit(f"unit_sandbox: prctl(PR_SET_MDWE): {reason} (Linux 6.3 or later)")
    print(
        f"unit_sandbox: {allowed} system calls allowed, others EPERM; MDWE {'off' if args.no_mdwe else 'on'}",
        file=sys.stderr,
    )
    sandbox.load()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
