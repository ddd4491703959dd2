"""Bearer tokens and their roles.

A token is ``wct_`` and 256 random bits (``secrets.token_urlsafe(32)``) – the prefix
tells secret scanners what it is and keeps it from starting with ``-``, which a command
line would take for an option –, shown once when made; the
database keeps its SHA-256 only (a hash suffices for a random secret of that size – there
is nothing to brute-force). Tokens are revoked, never deleted, so the audit log keeps
pointing at them; a revoked token authenticates nobody (401).

A role grants permissions; every API route asks for exactly one permission
(:mod:`.auth`):

===================  ====  =======  =====
role                 read  operate  admin
===================  ====  =======  =====
``viewer``           yes   no       no
``backup-operator``  yes   yes      no
``admin``            yes   yes      yes
===================  ====  =======  =====

*read*: inventory, tasks; *operate*: start and finish backups and restores, abort tasks;
*admin*: tokens, hosts, the audit log.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import secrets
from collections.abc import Callable

from sqlalchemy import select

from .database import Database
from .errors import ConflictError, NotFoundError, WinCenterError
from .models import Token, utcnow

__all__ = ["ROLE_PERMISSIONS", "Permission", "Role", "TokenInfo", "TokenStore", "token_digest"]


class Role(enum.StrEnum):
    VIEWER = "viewer"
    BACKUP_OPERATOR = "backup-operator"
    ADMIN = "admin"


class Permission(enum.StrEnum):
    READ = "read"
    OPERATE = "operate"
    ADMIN = "admin"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.BACKUP_OPERATOR: frozenset({Permission.READ, Permission.OPERATE}),
    Role.ADMIN: frozenset(Permission),
}


def token_digest(token: str) -> str:
    """The hex SHA-256 the database keeps of *token*."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """A token's record (never the token itself)."""

    id: int
    name: str
    role: Role
    created: datetime.datetime
    revoked: datetime.datetime | None

    @property
    def permissions(self) -> frozenset[Permission]:
        return ROLE_PERMISSIONS[self.role]

    def allows(self, permission: Permission) -> bool:
        return self.revoked is None and permission in self.permissions

    @classmethod
    def of(cls, row: Token) -> TokenInfo:
        return cls(row.id, row.name, Role(row.role), row.created, row.revoked)


def parse_role(text: str) -> Role:
    """*text* as a Role; WinCenterError naming the roles otherwise."""
    try:
        return Role(text)
    except ValueError:
        names = ", ".join(r.value for r in Role)
        raise WinCenterError(f"unknown role {text!r} (roles: {names})") from None


class TokenStore:
    """The tokens of one database. *clock* gives the time (tests fake it)."""

    def __init__(self, database: Database, clock: Callable[[], datetime.datetime] = utcnow):
        self.database = database
        self.clock = clock

    def create(self, role: Role | str, name: str | None = None) -> tuple[TokenInfo, str]:
        """A new token of *role*: its record and the token – the only time it exists in
        clear. Not idempotent: each call makes another token."""
        role = parse_role(role) if isinstance(role, str) else role
        token = "wct_" + secrets.token_urlsafe(32)
        with self.database.session() as s:
            row = Token(
                name=name or role.value, role=role.value, sha256=token_digest(token), created=self.clock()
            )
            s.add(row)
            s.flush()
            info = TokenInfo.of(row)
        return info, token

    def authenticate(self, token: str) -> TokenInfo | None:
        """The record of *token* if it is known and not revoked, else None."""
        with self.database.session() as s:
            row = s.scalars(select(Token).where(Token.sha256 == token_digest(token))).one_or_none()
            if row is None or row.revoked is not None:
                return None
            return TokenInfo.of(row)

    def get(self, token_id: int) -> TokenInfo:
        with self.database.session() as s:
            row = s.get(Token, token_id)
            if row is None:
                raise NotFoundError(f"no token {token_id}")
            return TokenInfo.of(row)

    def list(self, include_revoked: bool = True) -> list[TokenInfo]:
        """Every token, oldest first."""
        query = select(Token).order_by(Token.id)
        if not include_revoked:
            query = query.where(Token.revoked.is_(None))
        with self.database.session() as s:
            return [TokenInfo.of(row) for row in s.scalars(query)]

    def revoke(self, token_id: int) -> TokenInfo:
        """Revoke a token: from now on it gets 401. NotFoundError if unknown,
        ConflictError if already revoked (the first revocation time stays)."""
        with self.database.session() as s:
            row = s.get(Token, token_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"no token {token_id}")
            if row.revoked is not None:
                raise ConflictError(f"token {token_id} was revoked at {row.revoked.isoformat()}")
            row.revoked = self.clock()
            s.flush()
            return TokenInfo.of(row)
