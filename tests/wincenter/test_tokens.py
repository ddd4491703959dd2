"""Tokens on both engines: only the hash is stored, roles grant the matrix, revocation."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from agentless.wincenter.database import Database
from agentless.wincenter.errors import ConflictError, NotFoundError, WinCenterError
from agentless.wincenter.tokens import ROLE_PERMISSIONS, Permission, Role, TokenStore, token_digest


def test_roles_matrix() -> None:
    read, operate, admin = Permission.READ, Permission.OPERATE, Permission.ADMIN
    expected = {
        Role.VIEWER: {read},
        Role.BACKUP_OPERATOR: {read, operate},
        Role.ADMIN: {read, operate, admin},
    }
    assert expected == ROLE_PERMISSIONS


def test_create_authenticate_revoke(database: Database) -> None:
    tokens = TokenStore(database)
    info, token = tokens.create("backup-operator", "vendor")
    assert (info.name, info.role, info.revoked) == ("vendor", Role.BACKUP_OPERATOR, None)
    assert tokens.authenticate(token) == info
    assert tokens.authenticate(token + "x") is None
    with database.engine.connect() as c:
        stored = [tuple(row) for row in c.execute(text("SELECT sha256, name FROM tokens"))]
    assert stored == [(token_digest(token), "vendor")]  # the hash, never the token
    revoked = tokens.revoke(info.id)
    assert revoked.revoked is not None and not revoked.allows(Permission.READ)
    assert tokens.authenticate(token) is None
    with pytest.raises(ConflictError):
        tokens.revoke(info.id)
    with pytest.raises(NotFoundError):
        tokens.revoke(info.id + 100)
    assert [t.id for t in tokens.list()] == [info.id]
    assert tokens.list(include_revoked=False) == []


def test_each_token_is_new_and_roles_are_checked(database: Database) -> None:
    tokens = TokenStore(database)
    (a, token_a), (b, token_b) = tokens.create(Role.VIEWER), tokens.create(Role.VIEWER)
    assert a.id != b.id and token_a != token_b and a.name == "viewer"
    with pytest.raises(WinCenterError, match="unknown role 'root'"):
        tokens.create("root")
