"""A WinCenter's state directory, made by ``wincenter init --dir D``::

    D/
      center.json          identity: magic, version, center uuid, name, database URL (or
                           null: the SQLite file below) – 0600, a URL may hold a password
      pki/ca-cert.pem      the center's own CA: what clients pin (CenterClient's ca_cert_pem)
      pki/ca-key.pem       (0600)
      pki/server-cert.pem  the HTTPS certificate, for the center's names and addresses
      pki/server-key.pem   (0600)
      secret.key           AES-256-GCM key sealing the host credentials (0600, :mod:`.secretbox`)
      center.db            SQLite, the default database (SQLAlchemy 2, Alembic migrations)

The directory is built under a temporary name and renamed into place, so an interrupted
``init`` leaves nothing half-made; an existing center is never overwritten. The first
admin token is made by ``init`` and shown once; the database keeps its hash only.

:class:`Center` is the open directory with its stores; the API, the daemon and the CLI
all work through it. The database may be another one than ``center.json`` says (the
``--db`` option, e.g. a PostgreSQL shared by several WinCenter processes).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from agentless.lifetime import Closing
from agentless.statedir import building, read_identity, write_pki, write_private

from .audit import AuditLog
from .database import Database, sqlite_url
from .errors import CenterDirError
from .models import utcnow
from .secretbox import SecretBox
from .tasks import TaskStore
from .tokens import Role, TokenStore

__all__ = ["CENTER_MAGIC", "DEFAULT_PORT", "Center", "CenterIdentity"]

CENTER_MAGIC = "agentless-wincenter"
CENTER_VERSION = 1
DEFAULT_PORT = 9443


@dataclasses.dataclass(frozen=True)
class CenterIdentity:
    uuid: str
    name: str
    database: str | None  # None: D/center.db

    def to_json(self) -> dict[str, Any]:
        return {
            "magic": CENTER_MAGIC,
            "version": CENTER_VERSION,
            "uuid": self.uuid,
            "name": self.name,
            "database": self.database,
        }

    @classmethod
    def from_json(cls, data: Any, path: str) -> CenterIdentity:
        if not isinstance(data, dict) or data.get("magic") != CENTER_MAGIC:
            raise CenterDirError(f"{path}: not a WinCenter file")
        if data.get("version") != CENTER_VERSION:
            raise CenterDirError(
                f"{path}: center format version {data.get('version')}, expected {CENTER_VERSION}"
            )
        try:
            database = data["database"]
            return cls(str(data["uuid"]), str(data["name"]), None if database is None else str(database))
        except KeyError as error:
            raise CenterDirError(f"{path}: malformed center file (no {error})") from None


class Center(Closing):
    """An initialised center directory, open: identity, PKI paths, the database and its
    stores (tokens, tasks, audit), the secret box. *clock* is shared by the stores."""

    def __init__(
        self,
        directory: str,
        identity: CenterIdentity,
        database: Database,
        secrets: SecretBox,
        clock: Callable[[], datetime.datetime] = utcnow,
    ):
        self.directory = directory
        self.identity = identity
        self.database = database
        self.secrets = secrets
        self.tokens = TokenStore(database, clock)
        self.tasks = TaskStore(database, clock)
        self.audit = AuditLog(database, clock)

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        *,
        name: str | None = None,
        addresses: Sequence[str] = ("127.0.0.1", "localhost"),
        database_url: str | None = None,
    ) -> tuple[Center, str]:
        """Make a new center in *directory* (which must not exist, or be empty): CA and
        server certificate, secret key, database at the newest schema, and a first admin
        token – returned with the open center, the only time it is available.
        *database_url*: keep the data there instead of ``D/center.db`` (recorded)."""
        identity = CenterIdentity(str(uuid.uuid4()), name or os.uname().nodename, database_url)
        with building(directory, CenterDirError, "wincenter") as staging:
            write_pki(staging, f"WinCenter CA {identity.name}", identity.name, addresses)
            SecretBox.create(os.path.join(staging, "secret.key"))
            write_private(
                os.path.join(staging, "center.json"), json.dumps(identity.to_json(), indent=2) + "\n"
            )
            url = database_url or sqlite_url(os.path.join(staging, "center.db"))
            with Database.open(url, create=True) as database:
                _info, token = TokenStore(database).create(Role.ADMIN, "admin")
        return cls.open(directory), token

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        database_url: str | None = None,
        clock: Callable[[], datetime.datetime] = utcnow,
    ) -> Center:
        """Open an initialised center (migrating its database to the newest schema);
        *database_url* overrides the one ``center.json`` names. CenterDirError if the
        directory is not a center, DatabaseError if the database cannot be used."""
        target = os.path.abspath(os.fspath(directory))
        data = read_identity(target, "center.json", CenterDirError, "WinCenter", "wincenter init")
        identity = CenterIdentity.from_json(data, os.path.join(target, "center.json"))
        secrets = SecretBox.load(os.path.join(target, "secret.key"))
        url = database_url or identity.database or sqlite_url(os.path.join(target, "center.db"))
        database = Database.open(url, create=database_url is not None and url.startswith("sqlite"))
        return cls(target, identity, database, secrets, clock)

    def pki_path(self, name: str) -> str:
        """Path of ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``..."""
        return os.path.join(self.directory, "pki", name)

    @property
    def ca_cert_pem(self) -> str:
        with open(self.pki_path("ca-cert.pem")) as f:
            return f.read()

    def close(self) -> None:
        self.database.close()
