"""``make demo`` runs ``python -m agentless.demo``: it must succeed and say so."""

from __future__ import annotations

import subprocess
import sys


def test_demo_succeeds() -> None:
    """The four acts of the demo run and check their data byte for byte."""
    result = subprocess.run(
        [sys.executable, "-m", "agentless.demo"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo succeeded" in result.stdout
    assert "as written: True" in result.stdout
    assert "backup == disks: True; restored == disks: True" in result.stdout
    assert "== the disks at the incremental backup: True" in result.stdout
