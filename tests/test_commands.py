"""What every command-line tool does around its sub-commands (:mod:`agentless.commands`)."""

from __future__ import annotations

import resource
import subprocess
import sys


def test_a_command_raises_its_soft_open_files_limit_to_the_hard_one() -> None:
    """An index cache holds a descriptor per run, so a command must not stop at a soft
    limit of 256 while the hard one allows more."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256 if hard == resource.RLIM_INFINITY else min(256, hard)
    script = (
        "import resource\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, hard))\n"
        "from agentless.commands import raise_open_files_limit\n"
        "raise_open_files_limit()\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    soft_after, hard_after = (int(n) for n in done.stdout.split())
    assert hard_after == hard
    if hard != resource.RLIM_INFINITY:
        assert soft_after == hard  # 20 000 here, against 256 before
    else:
        assert soft_after >= low
