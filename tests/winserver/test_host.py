"""The host state directory: init makes everything once, open validates it."""

from __future__ import annotations

import json
import os
import ssl
import stat
from pathlib import Path

import pytest

from agentless.pki import subject_of
from agentless.winserver.host import Host, HostError
from agentless.winserver.metadata import Metadata, MetadataError, StorageRepository


def test_init_makes_a_complete_host(tmp_path: Path) -> None:
    """CA and server certificate (keys private), token stored only as a hash, metadata
    database with a default SR, identity file with magic and version."""
    host, token = Host.init(tmp_path / "h", name="host1", addresses=["127.0.0.1", "host1.example"])
    with host:
        assert host.identity.name == "host1"
        assert host.check_token(token)
        assert not host.check_token(token + "x")
        assert token not in (tmp_path / "h" / "token.sha256").read_text()
        for key in ("ca-key.pem", "server-key.pem"):
            assert stat.S_IMODE(os.stat(host.pki_path(key)).st_mode) == 0o600
        assert subject_of(host.server_cert_pem) == "CN=host1"
        ssl.create_default_context(cafile=host.pki_path("ca-cert.pem"))  # a valid CA file
        with host.metadata.session() as session:
            (sr,) = session.query(StorageRepository).all()
            assert sr.is_default and os.path.isdir(host.sr_path(sr))
    data = json.loads((tmp_path / "h" / "host.json").read_text())
    assert data["magic"] == "agentless-winserver-host" and data["version"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".winserver-init-")]


def test_init_never_overwrites(tmp_path: Path) -> None:
    """An existing host (or any non-empty directory) is refused untouched."""
    Host.init(tmp_path / "h")[0].close()
    before = (tmp_path / "h" / "host.json").read_bytes()
    with pytest.raises(HostError, match="not an empty directory"):
        Host.init(tmp_path / "h")
    assert (tmp_path / "h" / "host.json").read_bytes() == before
    (tmp_path / "empty").mkdir()
    Host.init(tmp_path / "empty")[0].close()  # an empty directory is fine


def test_open_refuses_what_is_not_a_host(tmp_path: Path) -> None:
    """A missing directory, a foreign host.json, another version: clear errors."""
    with pytest.raises(HostError, match="not a WinServer host directory"):
        Host.open(tmp_path / "nothing")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "host.json").write_text('{"magic": "other"}')
    with pytest.raises(HostError, match="not a WinServer host file"):
        Host.open(tmp_path / "x")
    (tmp_path / "x" / "host.json").write_text('{"magic": "agentless-winserver-host", "version": 9}')
    with pytest.raises(HostError, match="version 9"):
        Host.open(tmp_path / "x")
    (tmp_path / "x" / "host.json").write_text("not json")
    with pytest.raises(HostError, match="unreadable"):
        Host.open(tmp_path / "x")


def test_metadata_requires_init(tmp_path: Path) -> None:
    """Opening a database that was never made is refused, not silently created."""
    with pytest.raises(MetadataError, match="winserver init"):
        Metadata(tmp_path / "metadata.db")
    assert not (tmp_path / "metadata.db").exists()
