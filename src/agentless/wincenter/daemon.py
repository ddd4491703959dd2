"""``wincenter serve``: the REST API on uvicorn over HTTPS, and the center's periodic work.

The listening socket is bound before uvicorn starts, so a port in use is an OSError for
the CLI (one line, exit 1), and ``--port 0`` picks a free port (printed). Once it
listens, the daemon prints one line – ``wincenter NAME: API https://ADDR:PORT/api/v1
(DIALECT)`` – which scripts and tests wait for. Periodic jobs run in worker threads
every few seconds until SIGINT or SIGTERM:

- task expiry (:meth:`~.tasks.TaskStore.expire`): tasks not ended by ``expires_at``;
  the backups and restores of expired tasks release what they hold on the hosts; queued
  backups that have waited too long behind a backup that cannot be released fail
  (:meth:`~.backups.Backups.give_up_waiting`); steps that lost the database (PostgreSQL
  restarted) are recovered once it answers again (:meth:`~.orchestrator.Orchestrator.resume`);
- the instant restores' poller (every second, ``--migration-poll``): each ``migrating``
  restore's progress read from its host, completed when its disks are local
  (:meth:`~.restores.Restores.poll_migrations`);
- inventory sync (every 60 s): every registered host's pools and VMs, so that changes
  made on a host directly show up; an unreachable host is marked so, a host that answers
  has the steps that failed on it tried again at once (:mod:`.retries`).

Before it listens the daemon recovers (:meth:`~.orchestrator.Orchestrator.recover`): the
backups and restores a killed run left halfway are finished or undone.

The same port serves the web console under ``/console/`` (:mod:`.console`): sign in
with a WinCenter token; ``--console-recheck`` sets how often a session's token is asked
again (a revoked token's sessions end within that time).

It listens on loopback unless ``--bind`` names another address (one that backup systems
reach). The API reads a request body only from a caller with a valid token and up to
1 MiB (:mod:`agentless.httpguard`), and serves at most :data:`CONCURRENCY` connections
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import signal
from collections.abc import Callable

import uvicorn

from agentless.httpguard import UVICORN_LIMITS, listening_socket
from agentless.redaction import redact

from .api import make_app
from .backups import QUEUE_WAIT
from .center import Center
from .console import RECHECK_SECONDS
from .orchestrator import DEFAULT_TASK_TTL, Orchestrator, database_gone
from .restores import MIGRATION_POLL_SECONDS
from .retries import FIRST_SECONDS
from .schemas import API_PREFIX

__all__ = ["CONCURRENCY", "EXPIRE_SECONDS", "LOOPBACK", "serve"]

log = logging.getLogger(__name__)
EXPIRE_SECONDS = 5.0
SYNC_SECONDS = 60.0
CONCURRENCY = 256  # connections (or requests) at once; past it, 503
LOOPBACK = "127.0.0.1"


async def _every(seconds: float, job: Callable[[], object], stop: asyncio.Event) -> None:
    """Run *job* in a worker thread every *seconds* until *stop*; a failing run is logged
    and the next one comes as planned. While the database is unreachable the job says so
    in one line, once, and once more when it is back: a traceback at every run would
    fill the log for as long as the database is away."""
    name = getattr(job, "__name__", job)
    away = False
    while not stop.is_set():
        try:
            await asyncio.to_thread(job)
        except Exception as error:
            if not database_gone(error):
                log.exception("periodic job %s failed", name)
            elif not away:
                reason = redact(str(error.__cause__ or error).splitlines()[0])
                said = "periodic job %s: the database is unreachable (%s); trying every %g s"
                log.warning(said, name, reason, seconds)
                away = True
        else:
            if away:
                log.warning("periodic job %s: the database answers again", name)
            away = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)


def _expire(center: Center, orchestrator: Orchestrator) -> None:
    orchestrator.resume()  # steps that lost the database, once it is back
    expired = center.tasks.expire()
    for task in expired:
        log.warning("task %s (%s %s) expired", task.id, task.kind, task.owner_key or "")
    orchestrator.expired(expired)
    orchestrator.backups.give_up_waiting()


async def _run(
    center: Center, bind: str, port: int, orchestrator: Orchestrator, console_recheck: float
) -> None:
    sock = listening_socket(bind, port, inheritable=True)
    orchestrator.recover()
    config = uvicorn.Config(
        make_app(center, orchestrator, console_recheck=console_recheck),
        ssl_certfile=center.pki_path("server-cert.pem"),
        ssl_keyfile=center.pki_path("server-key.pem"),
        log_level="warning",
        lifespan="off",
        limit_concurrency=CONCURRENCY,
        **UVICORN_LIMITS,
    )
    api = uvicorn.Server(config)
    api_task = asyncio.create_task(api.serve(sockets=[sock]))
    try:
        while not api.started:
            if api_task.done():
                api_task.result()  # raises why it could not start
                raise RuntimeError("the API stopped at start")
            await asyncio.sleep(0.02)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):  # before the line: a signal on it stops cleanly
            loop.add_signal_handler(signum, stop.set)
        address, actual = sock.getsockname()[:2]
        host = f"[{address}]" if ":" in address else address
        print(
            f"wincenter {center.identity.name}: API https://{host}:{actual}{API_PREFIX} "
            f"({center.database.dialect})",
            flush=True,
        )

        def expire() -> None:  # named: the log names the job
            _expire(center, orchestrator)

        jobs = [
            asyncio.create_task(_every(EXPIRE_SECONDS, expire, stop)),
            asyncio.create_task(_every(SYNC_SECONDS, orchestrator.inventory.sync_all, stop)),
            asyncio.create_task(
                _every(orchestrator.migration_poll, orchestrator.restores.poll_migrations, stop)
            ),
        ]
        await stop.wait()
        await asyncio.gather(*jobs)
    finally:
        api.should_exit = True
        await api_task
        sock.close()


def serve(
    center: Center,
    bind: str = LOOPBACK,
    port: int = 9443,
    task_ttl: datetime.timedelta = DEFAULT_TASK_TTL,
    retry_first: float = FIRST_SECONDS,
    queue_wait: datetime.timedelta = QUEUE_WAIT,
    migration_poll: float = MIGRATION_POLL_SECONDS,
    console_recheck: float = RECHECK_SECONDS,
) -> None:
    """Serve *center* on *bind*:*port* until SIGINT or SIGTERM; backups and restores left
    unfinished for *task_ttl* expire; a step that failed on a host is tried again after
    *retry_first* seconds (then twice as long each time); a queued backup waits at most
    *queue_wait* behind a backup of its VM that cannot be released; the progress of
    instant restores is read from their hosts every *migration_poll* seconds; a console
    session's token is asked again every *console_recheck* seconds."""
    with Orchestrator(
        center, task_ttl, retry_first=retry_first, queue_wait=queue_wait, migration_poll=migration_poll
    ) as orchestrator:
        asyncio.run(_run(center, bind, port, orchestrator, console_recheck))
