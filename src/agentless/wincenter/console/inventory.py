"""The console's inventory pages: hosts (sync, admins), storage pools, VMs and one VM
(start and stop, operators and admins).

Each page reads through the orchestrator's :class:`~..inventory.Inventory`, and each
action calls the method the REST route calls, with the route's permission:

==========================================  ========  ==================================
``GET  /console/hosts``                     read      ``GET /api/v1/hosts``
``POST /console/hosts/{id}/sync``           admin     ``POST /api/v1/hosts/{id}/sync``
``GET  /console/pools``                     read      ``GET /api/v1/pools``
``GET  /console/vms[?offset=]``             read      ``GET /api/v1/vms``
``GET  /console/vms/{id}``                  read      ``GET /api/v1/vms/{id}``
``POST /console/vms/{id}/start|stop``       operate   ``POST /api/v1/vms/{id}/start|stop``
==========================================  ========  ==================================
"""

from __future__ import annotations

import urllib.parse
from typing import Literal

from fastapi import Depends, Request
from fastapi.responses import Response

from agentless.console import Session
from agentless.pki import fingerprint

from ..errors import WinCenterError
from .site import Actor, WinCenterConsole, number

__all__ = ["PAGE", "add_routes"]

PAGE = 50  # VMs per page
_DONE = {"start": "started", "stop": "stopped"}


def _pin(cert_pem: str) -> str:
    """The SHA-256 fingerprint WinCenter pins, as colon-separated pairs."""
    try:
        digest = fingerprint(cert_pem)
    except ValueError:
        return "(not a certificate)"
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()


def add_routes(site: WinCenterConsole) -> None:
    """Add the inventory pages to *site*'s console."""
    console = site.console
    router = console.router
    inventory = site.orchestrator.inventory
    reader = console.page("read")
    admin = site.acting("admin")
    operator = site.acting("operate")

    def host_names() -> dict[str, str]:
        return {host.id: host.name for host in inventory.hosts()}

    @router.get("/hosts")
    def hosts(request: Request, session: Session = Depends(reader)) -> Response:
        rows = [(host, _pin(host.cert)) for host in inventory.hosts()]
        return site.render(request, session, "wincenter/hosts.html", heading="Hosts", hosts=rows)

    @router.post("/hosts/{ref}/sync")
    def sync_host(ref: str, request: Request, actor: Actor = Depends(admin)) -> Response:
        try:
            host = inventory.sync(inventory.host(ref).id)
        except WinCenterError as error:
            return site.failed(request, actor.session, error, f"{site.prefix}/hosts")
        return site.done(request, actor, f"host {host.name} synced", "/hosts")

    @router.get("/pools")
    def pools(request: Request, session: Session = Depends(reader)) -> Response:
        return site.render(
            request,
            session,
            "wincenter/pools.html",
            heading="Storage pools",
            pools=inventory.pools(),
            hosts=host_names(),
        )

    @router.get("/vms")
    def vms(request: Request, offset: str = "", session: Session = Depends(reader)) -> Response:
        try:
            start = number(offset, "offset")
            found, total = inventory.vms(limit=PAGE, offset=start)
        except WinCenterError as error:
            return site.failed(request, session, error, f"{site.prefix}/vms")
        return site.render(
            request,
            session,
            "wincenter/vms.html",
            heading="VMs",
            vms=found,
            total=total,
            offset=start,
            page=PAGE,
            hosts=host_names(),
        )

    @router.get("/vms/{ref}")
    def vm(ref: str, request: Request, session: Session = Depends(reader)) -> Response:
        try:
            found = inventory.vm(ref)
        except WinCenterError as error:
            return site.failed(request, session, error, f"{site.prefix}/vms")
        return site.render(
            request,
            session,
            "wincenter/vm.html",
            heading=f"VM {found.name}",
            vm=found,
            hosts=host_names(),
            quoted=urllib.parse.quote(found.id, safe=""),
        )

    def power(ref: str, request: Request, actor: Actor, action: Literal["start", "stop"]) -> Response:
        back = f"/vms/{urllib.parse.quote(ref, safe='')}"
        try:
            found = inventory.power(ref, action)
        except WinCenterError as error:
            return site.failed(request, actor.session, error, f"{site.prefix}{back}")
        return site.done(request, actor, f"VM {found.name} {_DONE[action]}", back)

    @router.post("/vms/{ref}/start")
    def start_vm(ref: str, request: Request, actor: Actor = Depends(operator)) -> Response:
        return power(ref, request, actor, "start")

    @router.post("/vms/{ref}/stop")
    def stop_vm(ref: str, request: Request, actor: Actor = Depends(operator)) -> Response:
        return power(ref, request, actor, "stop")
