"""What the backup console's pages reach the daemon through: :class:`ConsoleSite` (the
scheduler, the state database, WinCenter, the repositories, the console's work board)
and :func:`identify`, how a WinCenter token signs in (:mod:`.console` says who may do
what)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from agentless.console import Console, Identity, Session
from agentless.wincenter.client import CenterApiError, CenterClient, CenterError

from .catalog import Catalog
from .consolework import WorkBoard
from .daemon import Daemon
from .instantjob import repo_for_daemon
from .jobcli import ERRORS
from .policies import State
from .repository import Repository
from .scheduler import Scheduler

__all__ = ["EXPECTED", "USAGE_SECONDS", "ConsoleSite", "identify", "problem"]

USAGE_SECONDS = 60.0  # a repository's usage figures are computed, its catalog synced, at most once a minute
EXPECTED: tuple[type[BaseException], ...] = (*ERRORS, KeyError, ValueError, OSError, CenterError)
"""The failures console work reports in one line (a backup's, a restore's, WinCenter's,
a repository the console does not know)."""


def identify(center_access: Callable[[], tuple[str, str]]) -> Callable[[str], Identity | None]:
    """The sessions' *authenticate*: a WinCenter token -> its name and role, asked of the
    WinCenter at *center_access*'s (URL, CA PEM). None for a token WinCenter refuses
    (401); WinCenter unreachable raises (the sign-in page says so)."""

    def authenticate(token: str) -> Identity | None:
        url, ca_pem = center_access()
        try:
            with CenterClient(url, token, ca_pem, timeout=15.0) as center:
                who = center.whoami()
        except CenterApiError as error:
            if error.status in (401, 403):
                return None
            raise
        return Identity(who.name, who.role, frozenset(who.permissions))

    return authenticate


class ConsoleSite:
    """What the console's pages reach the daemon through."""

    def __init__(
        self,
        daemon: Daemon,
        center: Callable[[], CenterClient],
        password: str | None,
        default_repo: str | None,
        log: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.daemon = daemon
        self.scheduler: Scheduler = daemon.scheduler
        self.state: State = daemon.scheduler.state
        self.center = center
        self.password = password
        self.default_repo = repo_for_daemon(default_repo) if default_repo else None
        self.log = log
        self.board = WorkBoard(EXPECTED, log)
        self._clock = clock
        self._usage: dict[str, tuple[float, dict[str, Any]]] = {}
        self._usage_lock = threading.Lock()
        self._synced: dict[str, float] = {}  # by location: when a page last synced its catalog
        self._synced_lock = threading.Lock()

    def repositories(self) -> list[str]:
        """The default repository and the policies' (and their off-site copies'), once each."""
        found = [self.default_repo] if self.default_repo else []
        for policy in self.state.policies():
            found.append(policy.repo)
            if policy.copy_to:
                found.append(policy.copy_to)
        return list(dict.fromkeys(found))

    def known_repository(self, location: str) -> str:
        """*location* when it is one of :meth:`repositories` (a form names one; the
        console opens no other place a request names). KeyError otherwise."""
        if location not in self.repositories():
            raise KeyError(location)
        return location

    @contextlib.contextmanager
    def repository(self, location: str | None = None) -> Iterator[Repository]:
        """A repository the console knows (default: the default one), open."""
        where = self.known_repository(location) if location else self.default_repo
        if where is None:
            raise KeyError("no default repository: configure one (`vmbackup config --repo`)")
        with Repository.open(where, self.password) as opened:
            yield opened

    def cached_usage(self, location: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """*compute*'s figures for *location*, computed again at most every minute."""
        now = self._clock()
        with self._usage_lock:
            seen = self._usage.get(location)
            if seen is not None and now - seen[0] < USAGE_SECONDS:
                return seen[1]
        figures = compute()
        with self._usage_lock:
            self._usage[location] = (now, figures)
        return figures

    def catalog(self, repository: Repository) -> Catalog:
        """*repository*'s restore-point catalog for a page's queries, synced with the
        repository's listing if this console last synced it :data:`USAGE_SECONDS` ago or
        more (a listing of ``points/`` is O(restore points): one per 1 000 on S3), else as
        it is – this worker's own backups and prunes are in it already, other workers'
        show within a minute. A temporary catalog (``--no-cache``) is synced every time."""
        catalog = repository.catalog()
        where = repository.backend.location
        now = self._clock()
        with self._synced_lock:
            last = self._synced.get(where)
        if catalog.temporary or last is None or now - last >= USAGE_SECONDS:
            catalog.sync()
            with self._synced_lock:
                self._synced[where] = now
        return catalog


def problem(console: Console, request: Request, session: Session, status: int, detail: str) -> Response:
    """A page that says in one line why a request cannot be done."""
    return console.render(
        request, session, "backup/problem.html", status, heading="Cannot do that", detail=detail
    )
