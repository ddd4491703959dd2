"""The backup console: the pages people run vmbackup from, served by ``vmbackup serve``.

``vmbackup serve --console-listen HOST:PORT`` serves it over HTTPS (:mod:`.consoleserver`)
with the shared frame of :mod:`agentless.console` (sessions, CSRF, security headers).

**Who signs in.** A WinCenter token: the console asks WinCenter's ``/whoami`` with it
(through the WinCenter this daemon is configured for) and takes the token's role, so
the console's roles are the platform's:

================  ===========================================================
permission        what the console offers
================  ===========================================================
``read``          dashboard, VMs, restore points, policies, jobs, workers
``operate``       back up now, restore, instant restore, browse and download
                  files, verify, run a policy now
``admin``         create, edit and delete policies; prune; gc
================  ===========================================================

Browsing a restore point's files reads the VM's data, so it is an operator's, not a
viewer's. The work itself is done with this daemon's own credentials (its WinCenter
token, the repository password), as the scheduler's is; the console records who asked
(:mod:`.consolework`, the daemon's log).

The pages live in modules of their own (:mod:`.consolevms`, :mod:`.consolepolicies`,
:mod:`.consolepoints`); this one makes the app, the dashboard and :class:`ConsoleSite`,
what every page reaches the daemon through.
"""

from __future__ import annotations

import datetime
import functools
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from agentless.console import Console, NavItem, Session, SessionStore

from . import consolepoints, consolepolicies, consolevms
from .consolepoints import repository_usage
from .consolesite import ConsoleSite

__all__ = ["TEMPLATES", "make_console_app"]

TEMPLATES = Path(__file__).resolve().parent / "templates"


def make_console_app(site: ConsoleSite, sessions: SessionStore) -> FastAPI:
    """The console's ASGI app (the whole server is the console: paths from ``/``)."""
    app = FastAPI(title="vmbackup console", docs_url=None, redoc_url=None, openapi_url=None)
    console = Console(
        name="vmbackup",
        title="vmbackup",
        sessions=sessions,
        templates=[TEMPLATES],
        prefix="",
        nav=[
            NavItem("Dashboard", "/", "read"),
            NavItem("VMs", "/vms", "read"),
            NavItem("Restore points", "/points", "read"),
            NavItem("Policies", "/policies", "read"),
            NavItem("Jobs", "/jobs", "read"),
            NavItem("Repositories", "/repositories", "read"),
        ],
    )
    reader = console.page("read")

    @console.router.get("/", response_class=HTMLResponse)
    def dashboard(request: Request, session: Session = Depends(reader)) -> Response:
        figures = _dashboard(site)
        return console.render(request, session, "backup/dashboard.html", heading="Dashboard", **figures)

    consolevms.add_pages(console, site)
    consolepolicies.add_pages(console, site)
    consolepoints.add_pages(console, site)
    console.install(app)
    return app


def _dashboard(site: ConsoleSite) -> dict[str, Any]:
    """What the dashboard shows: problems, last runs and failures, next runs, each
    repository's usage."""
    status, health = site.daemon.health()
    runs = site.state.runs(limit=10)
    upcoming = sorted(site.scheduler.next_runs().items(), key=lambda item: item[1])[:10]
    usage = []
    for location in site.repositories():
        try:
            figures = site.cached_usage(location, functools.partial(repository_usage, site, location))
            usage.append(figures | {"repo": location})
        except Exception as error:  # a repository away is a problem to show, not a failed page
            usage.append({"repo": location, "error": str(error) or type(error).__name__})
    return {
        "health": health,
        "healthy": status == 200,
        "runs": [run.describe() for run in runs],
        "failures": [run.describe() for run in runs if run.state not in ("succeeded", "running")],
        "upcoming": [(name, moment.astimezone(datetime.UTC).isoformat()) for name, moment in upcoming],
        "usage": usage,
        "console_jobs": site.board.jobs()[:5],
    }
