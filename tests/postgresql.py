"""The ``postgresql_cluster`` and ``db_url`` fixtures (a plugin: ``tests/conftest.py``), for
every package whose state may live in PostgreSQL (WinCenter, the backup policies).

PostgreSQL: one private cluster per test session (per xdist worker) – ``initdb`` and
``pg_ctl`` from Debian's ``/usr/lib/postgresql/<version>/bin`` (or ``$PATH``), in a
temporary directory, on a free TCP port of 127.0.0.1 with trust authentication and no
fsync. PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` system
user (or ``nobody``) through ``runuser``, in a directory that user owns. Each test gets
a database of its own. Without PostgreSQL (``apt-get install postgresql``; ``make test``
as root installs it) or when it cannot start, the postgresql cases skip and say why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import pytest

from agentless.wincenter.database import sqlite_url
from tests.helpers import free_port

__all__ = [
    "ENGINES",
    "PgCluster",
    "PostgresUnavailable",
    "db_url",
    "postgresql_cluster",
    "running_postgresql",
]

ENGINES = ["sqlite", "postgresql"]


def _pg_bindir() -> str | None:
    def version(path: str) -> float:
        try:
            return float(path.split("/")[-3])
        except ValueError:
            return 0.0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


@dataclasses.dataclass
class PgCluster:
    port: int
    pg_ctl: list[str] = dataclasses.field(default_factory=list)  # [runuser...] pg_ctl -D DATA -l LOG
    options: str = ""  # the server options it was started with (the same port again)
    cwd: str = ""
    host: str = "127.0.0.1"  # the address it listens on (a network namespace's: tests/netns.py)

    def _control(self, *args: str) -> None:
        done = subprocess.run(
            [*self.pg_ctl, *args], capture_output=True, text=True, timeout=60, cwd=self.cwd or None
        )
        assert done.returncode == 0, f"pg_ctl {' '.join(args)}: {(done.stderr or done.stdout).strip()}"

    def stop(self) -> None:
        """Stop the cluster (``pg_ctl stop -m fast``: open sessions are cut, as in a restart)."""
        self._control("-m", "fast", "-w", "-t", "30", "stop")

    def start(self) -> None:
        """Start it again: the same data directory and port."""
        self._control("-w", "-t", "30", "-o", self.options, "start")

    def restart(self, down: float = 0.0) -> None:
        """Stop, stay down *down* seconds, start again."""
        self.stop()
        time.sleep(down)
        self.start()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(
            f"host={self.host} port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class PostgresUnavailable(Exception):
    """No PostgreSQL cluster can run here; the message says why (and how to get one)."""


def _run_as() -> tuple[list[str], int | None, int | None]:
    if os.geteuid() != 0:
        return [], None, None
    for user in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"], entry.pw_uid, entry.pw_gid
    raise PostgresUnavailable(
        "running as root and neither a postgres nor a nobody user exists to run PostgreSQL"
    )


@contextlib.contextmanager
def running_postgresql(
    host: str = "127.0.0.1", port: int = 0, inside: Sequence[str] = ()
) -> Iterator[PgCluster]:
    """A private PostgreSQL cluster, stopped and removed on the way out; PostgresUnavailable
    (saying why) when none can run. The session fixture and the fault campaign's load row
    (bench/campaign/load.py) start theirs with it; :meth:`PgCluster.restart` restarts it in
    place (tests/wincenter/pgrestart.py).

    It listens on *host* (127.0.0.1 unless told), on *port* (0: a free one of 127.0.0.1);
    *inside* prefixes its ``initdb`` and ``pg_ctl`` (``ip netns exec NAME``: the cluster
    runs in that network namespace, tests/netns.py)."""
    bindir = _pg_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            "PostgreSQL not installed (Debian: apt-get install postgresql; `make test` as root)"
        )
    prefix, uid, gid = _run_as()
    prefix = [*inside, *prefix]
    top = tempfile.mkdtemp(prefix="agentless-pg-")
    data = os.path.join(top, "data")
    log = os.path.join(top, "postgres.log")
    if uid is not None and gid is not None:
        os.chown(top, uid, gid)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=60, cwd=top)

    try:
        init = run(f"{bindir}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(init.stderr or init.stdout).strip()[-300:]}")
        if host != "127.0.0.1":  # trust the clients of its own subnet (initdb trusts loopback's)
            with open(os.path.join(data, "pg_hba.conf"), "a") as hba:
                hba.write("host all all samenet trust\n")
        port = port or free_port()  # PostgreSQL cannot pick a port and say which
        options = (
            f"-p {port} -k {top} -c listen_addresses={host} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        start = run(f"{bindir}/pg_ctl", "-D", data, "-l", log, "-w", "-t", "30", "-o", options, "start")
        if start.returncode != 0:
            tail = Path(log).read_text()[-300:] if os.path.exists(log) else start.stderr
            raise PostgresUnavailable(f"PostgreSQL did not start: {tail.strip()}")
        try:
            yield PgCluster(port, [*prefix, f"{bindir}/pg_ctl", "-D", data, "-l", log], options, top, host)
        finally:
            run(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop")
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="session")
def postgresql_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL cluster for this session (skips, saying why, if none can run)."""
    try:
        with running_postgresql() as cluster:
            yield cluster
    except PostgresUnavailable as why:
        pytest.skip(str(why))


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty database on each engine."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "center.db")
    cluster: PgCluster = request.getfixturevalue("postgresql_cluster")
    return cluster.create_database()
