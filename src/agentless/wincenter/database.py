"""The database of a WinCenter: SQLite by default, PostgreSQL for scale-out, one code path.

:meth:`Database.open` connects and brings the schema to the newest Alembic revision
(``upgrade head``, run in code: the migration scripts ship inside the package under
``migrations/``, no ``alembic.ini`` is needed). Every change runs in one transaction
(:meth:`Database.session`).

URLs: ``sqlite:///path`` or ``postgresql://user:password@host:port/name`` (psycopg 3 is
used for a bare ``postgresql://`` or ``postgres://``; another driver may be named:
``postgresql+psycopg://``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agentless.lifetime import Closing

from .errors import DatabaseError

__all__ = ["MIGRATIONS", "Database", "alembic_config", "normalise_url", "sqlite_url"]

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The URL of the SQLite file *path*."""
    return f"sqlite:///{os.path.abspath(os.fspath(path))}"


def normalise_url(url: str) -> URL:
    """*url* parsed, with psycopg 3 as the PostgreSQL driver unless one is named."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise DatabaseError(f"not a database URL: {url!r} ({error})") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise DatabaseError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")
    return parsed


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic configuration built in code: the packaged scripts, and *engine* handed
    to ``migrations/env.py`` (which then uses its connection)."""
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    """Foreign keys on (cascades), a write-ahead log, and a wait instead of an immediate
    "database is locked" when the CLI and the daemon write at once."""
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Database(Closing):
    """An open, migrated database. Safe to share between threads (one pool)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, create: bool = False, migrate: bool = True) -> Database:
        """Connect to *url* and run ``upgrade head``. A SQLite file must exist unless
        *create*. Raises DatabaseError (unreachable, unknown URL, failed migration)."""
        parsed = normalise_url(url)
        if parsed.get_backend_name() == "sqlite":
            path = parsed.database or ""
            if path in ("", ":memory:"):
                raise DatabaseError("an in-memory SQLite database cannot be shared: give a file")
            if not create and not os.path.exists(path):
                raise DatabaseError(f"{path}: no database (run `wincenter init`)")
            engine = create_engine(parsed)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(parsed, pool_pre_ping=True)
        try:
            database = cls(engine)
            if migrate:
                database.upgrade()
        except SQLAlchemyError as error:
            engine.dispose()
            where = parsed.render_as_string(hide_password=True)
            raise DatabaseError(f"{where}: {_first_line(error)}") from None
        except BaseException:
            engine.dispose()
            raise
        return database

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def upgrade(self, revision: str = "head") -> None:
        """Migrate to *revision* (idempotent: nothing happens when already there)."""
        command.upgrade(alembic_config(self.engine), revision)

    def revision(self) -> str | None:
        """The schema revision the database is at (None: empty database)."""
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @staticmethod
    def head() -> str | None:
        """The newest revision the packaged migrations know."""
        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on an exception.
        Objects stay readable after the block (no expiry on commit)."""
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()
