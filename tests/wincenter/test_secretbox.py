"""Host credentials at rest: AES-256-GCM under secret.key, bound to their owner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentless.wincenter.errors import SecretError
from agentless.wincenter.secretbox import SecretBox


def test_seal_and_open(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    box = SecretBox.create(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    sealed = box.seal_text("host-token", "host-uuid-1")
    assert b"host-token" not in sealed and sealed.startswith(b"AGSB\x01")
    assert sealed != box.seal_text("host-token", "host-uuid-1")  # a fresh nonce each time
    assert SecretBox.load(path).open_text(sealed, "host-uuid-1") == "host-token"
    with pytest.raises(SecretError, match="another owner"):
        box.open_text(sealed, "host-uuid-2")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecretError):
        box.open_text(tampered, "host-uuid-1")
    with pytest.raises(SecretError):
        SecretBox.create(tmp_path / "other.key").open_text(sealed, "host-uuid-1")
    with pytest.raises(SecretError, match="not a sealed"):
        box.open(b"junk")


def test_key_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    SecretBox.create(path)
    with pytest.raises(FileExistsError):
        SecretBox.create(path)
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        SecretBox.load(path)
    os.chmod(path, 0o600)
    path.write_text("something else\n")
    with pytest.raises(SecretError, match="not a WinCenter secret key"):
        SecretBox.load(path)
    with pytest.raises(SecretError, match="No such file"):
        SecretBox.load(tmp_path / "missing.key")
