"""A config that is hostile JSON: CorruptError (found by the fault campaign's fuzzing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentless.backup.keys import CorruptError
from agentless.backup.repository import Repository


def test_a_config_nested_too_deep_is_corrupt(tmp_path: Path) -> None:
    Repository.init(str(tmp_path / "r")).close()
    (tmp_path / "r" / "config").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CorruptError, match="config: malformed"):
        Repository.open(str(tmp_path / "r"))


def test_a_config_whose_mac_is_not_ascii_fails_its_check(tmp_path: Path) -> None:
    Repository.init(str(tmp_path / "r")).close()
    config = json.loads((tmp_path / "r" / "config").read_bytes())
    config["mac"] = "é" * 64  # compare_digest raised TypeError on non-ASCII str
    (tmp_path / "r" / "config").write_text(json.dumps(config))
    with pytest.raises(CorruptError, match="checksum mismatch"):
        Repository.open(str(tmp_path / "r"))
