"""The state directory: made whole or not at all, private, never overwritten, checked
when opened; the database may live elsewhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agentless.pki import subject_of
from agentless.wincenter.center import Center
from agentless.wincenter.errors import CenterDirError, DatabaseError


def test_init_makes_the_directory(tmp_path: Path) -> None:
    center, token = Center.init(tmp_path / "c", name="wc", addresses=["127.0.0.1"])
    with center:
        files = sorted(f for f in os.listdir(center.directory) if not f.startswith("center.db-"))
        assert files == ["center.db", "center.json", "pki", "secret.key"]
        for private in ("center.json", "secret.key", "pki/ca-key.pem", "pki/server-key.pem"):
            assert os.stat(os.path.join(center.directory, private)).st_mode & 0o077 == 0, private
        assert os.stat(center.directory).st_mode & 0o077 == 0
        assert subject_of(center.ca_cert_pem) == "CN=WinCenter CA wc"
        admin = center.tokens.authenticate(token)
        assert admin is not None and admin.role.value == "admin"
        assert [t.id for t in center.tokens.list()] == [admin.id]
        assert center.database.dialect == "sqlite"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".wincenter-init-")]


def test_init_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(CenterDirError, match="not an empty directory"):
        Center.init(tmp_path / "full")
    with pytest.raises(CenterDirError, match="no such directory"):
        Center.init(tmp_path / "missing" / "c")
    Center.init(tmp_path / "empty-ok")[0].close()
    (tmp_path / "empty").mkdir()
    Center.init(tmp_path / "empty")[0].close()


def test_open_checks_what_it_opens(tmp_path: Path) -> None:
    with pytest.raises(CenterDirError, match="not a WinCenter directory"):
        Center.open(tmp_path)
    Center.init(tmp_path / "c")[0].close()
    meta = tmp_path / "c" / "center.json"
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps(data | {"version": 99}))
    with pytest.raises(CenterDirError, match="version 99"):
        Center.open(tmp_path / "c")
    meta.write_text(json.dumps(data | {"magic": "other"}))
    with pytest.raises(CenterDirError, match="not a WinCenter file"):
        Center.open(tmp_path / "c")
    meta.write_text(json.dumps(data))
    os.remove(tmp_path / "c" / "center.db")
    with pytest.raises(DatabaseError, match="no database"):
        Center.open(tmp_path / "c")


def test_database_elsewhere(tmp_path: Path, db_url: str) -> None:
    """``init --db URL`` records the URL; open uses it, or the one it is given."""
    center, token = Center.init(tmp_path / "c", database_url=db_url)
    center.close()
    assert "center.db" not in os.listdir(tmp_path / "c")
    with Center.open(tmp_path / "c") as center:
        assert center.tokens.authenticate(token) is not None
    with Center.open(tmp_path / "c", f"sqlite:///{tmp_path}/other.db") as center:
        assert center.tokens.authenticate(token) is None  # another database: no tokens yet
        assert center.tokens.list() == []
