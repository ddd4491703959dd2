"""WinCenter's web console (``/console/`` on ``wincenter serve``'s HTTPS port): the
shared frame of :mod:`agentless.console` with WinCenter's pages – hosts, pools and VMs
(:mod:`.inventory`), tasks with live progress (:mod:`.tasks`), the audit log and the
tokens (:mod:`.admin`); :mod:`.site` holds what they share (sign-in by WinCenter token,
the audit of console actions)."""

from __future__ import annotations

from ..center import Center
from ..orchestrator import Orchestrator
from . import admin, inventory, tasks
from .site import PREFIX, RECHECK_SECONDS, WinCenterConsole

__all__ = ["PREFIX", "RECHECK_SECONDS", "WinCenterConsole", "build_console"]


def build_console(
    center: Center, orchestrator: Orchestrator, recheck: float = RECHECK_SECONDS
) -> WinCenterConsole:
    """The console of *center* with all its pages (*recheck*: seconds between two checks
    of a session's token); :meth:`~.site.WinCenterConsole.install` it on the API's app."""
    site = WinCenterConsole(center, orchestrator, recheck)
    inventory.add_routes(site)
    tasks.add_routes(site)
    admin.add_routes(site)
    return site
