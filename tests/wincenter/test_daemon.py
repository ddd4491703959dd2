"""``wincenter serve``: where it listens – loopback unless ``--bind``/``--listen`` says
otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import listening
from tests.wincenter.conftest import init_center


def _serve(directory: str, *extra: str) -> str:
    """Start ``wincenter serve`` with only *extra* options (and a free port), check that
    it listens on the address its first line names and nowhere else, stop it: that line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentless.wincenter.cli", "serve", "--dir", directory, "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "API https://" in line, line + (proc.stderr.read() if proc.stderr else "")
        named, port = line.split("https://")[1].split("/")[0].rsplit(":", 1)
        addresses = listening(int(port), proc.pid)
    finally:
        proc.terminate()
        _out, errors = proc.communicate(timeout=30)
    assert proc.returncode == 0, errors
    assert addresses == {named}, (addresses, line)
    return line


def test_serve_listens_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    """Without --bind: 127.0.0.1 only (every interface before). With --bind or --listen
    127.0.0.2 (another loopback address: the test opens nothing to the network): there."""
    directory = str(tmp_path / "center")
    init_center(directory)
    assert "API https://127.0.0.1:" in _serve(directory)
    for option in ("--bind", "--listen"):
        assert "API https://127.0.0.2:" in _serve(directory, option, "127.0.0.2")
