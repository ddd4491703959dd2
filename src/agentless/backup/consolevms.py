"""The backup console's VMs: WinCenter's list, a VM's page with its restore points, and
the work started from them – back up now (full or incremental, online or offline),
restore a restore point as a new VM, or instant-restore it (the VM runs at once on the
restore point served by this daemon).

The work runs as console jobs (:mod:`.consolework`) with the daemon's own WinCenter
token and repository password, as ``vmbackup backup`` and ``vmbackup restore`` would:
the same repository locks, the same journal of what a killed run leaves behind
(:mod:`.leftovers`), the same engines (:class:`~.backupjob.VmBackup`,
:class:`~.restorejob.VmRestore`, :class:`~.instantjob.InstantStart`). A request answers
at once with a redirect to the job's page, which follows its progress live.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from agentless.console import Console, Session
from agentless.wincenter.client import CenterError

from .backupjob import VmBackup
from .catalog import Brief
from .consolesite import ConsoleSite, problem
from .consolework import Busy, ConsoleJob
from .instantjob import InstantStart
from .instants import Instant
from .leftovers import Journal, reap
from .restorejob import VmRestore

__all__ = ["PAGE", "VM_POINTS", "add_pages"]

PAGE = 50  # VMs per page of the list
VM_POINTS = 100  # restore points a VM's page lists (the rest: /points?vm=<id>)
CONNECTIONS = 4  # NBD connections per disk, as the CLI's default


def add_pages(console: Console, site: ConsoleSite) -> None:
    """Add the VMs' pages and their actions to *console*."""
    reader, operator = console.page("read"), console.action("operate")

    @console.router.get("/vms", response_class=HTMLResponse)
    def vms(request: Request, page: int = 0, name: str = "", session: Session = Depends(reader)) -> Response:
        page = max(0, page)
        try:
            with site.center() as center:
                found = center.vms(name=name or None, limit=PAGE, offset=page * PAGE)
        except CenterError as error:
            return problem(console, request, session, 502, f"WinCenter: {error}")
        latest = _latest_points(site, {vm.id for vm in found.items})
        return console.render(
            request,
            session,
            "backup/vms.html",
            heading="VMs",
            vms=found.items,
            total=found.total,
            page=page,
            pages=max(1, -(-found.total // PAGE)),
            name=name,
            latest=latest,
        )

    @console.router.get("/vms/{ref}", response_class=HTMLResponse)
    def vm(request: Request, ref: str, session: Session = Depends(reader)) -> Response:
        try:
            with site.center() as center:
                found = center.vm(ref)
        except CenterError as error:
            return problem(console, request, session, 404, f"VM {ref!r}: {error}")
        points, total = _points_of(site, found.id)
        return console.render(
            request, session, "backup/vm.html", heading=found.name, vm=found, points=points, total=total
        )

    @console.router.post("/vms/{ref}/backup")
    def backup(
        request: Request,
        ref: str,
        type: str = Form("incremental"),
        mode: str = Form("online"),
        vm_name: str = Form(""),
        session: Session = Depends(operator),
    ) -> Response:
        if type not in ("incremental", "full") or mode not in ("online", "offline"):
            detail = "type: incremental or full; mode: online or offline"
            return problem(console, request, session, 400, detail)
        title = f"{type} {mode} backup of VM {vm_name[:64] or ref}"

        def work(job: ConsoleJob) -> Mapping[str, Any]:
            return _back_up(site, job, ref, full=type == "full", offline=mode == "offline")

        return _started(console, request, session, site, "backup", title, work)

    @console.router.post("/points/{point}/restore")
    def restore(
        request: Request,
        point: str,
        name: str = Form(""),
        target: str = Form(""),
        instant: str = Form(""),
        start: str = Form(""),
        session: Session = Depends(operator),
    ) -> Response:
        name, target = name.strip(), target.strip()
        if not name:
            return problem(console, request, session, 400, "give the new VM's name")
        kind = "instant" if instant else "restore"
        title = f"{'instant restore' if instant else 'restore'} of {point} as new VM {name}"

        def work(job: ConsoleJob) -> Mapping[str, Any]:
            if instant:
                return _instant(site, job, point, name, target, bool(start))
            return _restore(site, job, point, name, target)

        return _started(console, request, session, site, kind, title, work)


def _started(
    console: Console,
    request: Request,
    session: Session,
    site: ConsoleSite,
    kind: str,
    title: str,
    work: Any,
) -> Response:
    try:
        job = site.board.start(kind, title, session.identity.name, work)
    except Busy as error:
        return problem(console, request, session, 429, str(error))
    return RedirectResponse(f"/jobs/console/{job.id}", status_code=303)


def _latest_points(site: ConsoleSite, vm_ids: set[str]) -> dict[str, Brief]:
    """The newest restore point of each of *vm_ids* in the default repository (a query
    of its local catalog, :meth:`.ConsoleSite.catalog`: no object is read)."""
    if site.default_repo is None or not vm_ids:
        return {}
    try:
        with site.repository() as repository:
            return site.catalog(repository).newest(sorted(vm_ids))
    except Exception:  # the list of VMs is still worth showing without them
        return {}


def _points_of(site: ConsoleSite, vm_id: str) -> tuple[list[Brief], int]:
    """The VM's newest :data:`VM_POINTS` restore points in the default repository,
    newest first, and how many it has."""
    if site.default_repo is None:
        return [], 0
    with site.repository() as repository:
        return site.catalog(repository).page(vm_id, 0, VM_POINTS)


def _follow(job: ConsoleJob) -> Any:
    """A progress callback of the engines: their ``size``/``done`` into the job."""

    def update(engine: VmBackup | VmRestore) -> None:
        job.size, job.done = engine.size, engine.done

    return update


def _back_up(site: ConsoleSite, job: ConsoleJob, ref: str, full: bool, offline: bool) -> Mapping[str, Any]:
    job.phase = "snapshot"
    with (
        site.repository() as repository,
        repository.lock("shared", "backup") as lock,
        site.center() as center,
    ):
        reap(repository, center)
        journal = Journal(lock, center)
        engine = VmBackup(
            center,
            repository,
            ref,
            full,
            CONNECTIONS,
            _follow(job),
            journal,
            offline=offline,
            on_halted=journal.halted,
        )
        job.phase = "reading"
        result = engine.run()
    job.link = f"/points/{result['point']}"
    job.phase = "done"
    return result


def _target(site: ConsoleSite, target: str) -> tuple[str | None, str | None]:
    """(host, pool) of a target as the CLI's ``--target`` takes it (empty: WinCenter's choice)."""
    if not target:
        return None, None
    if target.startswith("pool:"):
        return None, target[5:]
    with site.center() as center:
        if any(pool.id == target for pool in center.pools()):
            return None, target
    return target, None


def _restore(site: ConsoleSite, job: ConsoleJob, point: str, name: str, target: str) -> Mapping[str, Any]:
    host, pool = _target(site, target)
    with (
        site.center() as center,
        site.repository() as repository,
        repository.lock("shared", "restore") as lock,
    ):
        reap(repository, center)
        job.phase = "writing"
        engine = VmRestore(
            center,
            repository,
            point,
            name,
            host,
            pool,
            CONNECTIONS,
            _follow(job),
            journal=Journal(lock, center).restore,
        )
        result = engine.run()
    job.link = f"/vms/{result['vm_id']}"
    job.phase = "done"
    return result


def _instant(
    site: ConsoleSite, job: ConsoleJob, point: str, name: str, target: str, start: bool
) -> Mapping[str, Any]:
    host, pool = _target(site, target)
    location = site.default_repo
    if location is None:
        raise KeyError("no default repository: configure one (`vmbackup config --repo`)")
    job.phase = "making the VM"
    with site.center() as center, site.repository() as repository:
        engine = InstantStart(
            center, repository, location, Instant(site.state), point, name, host, pool, start=start
        )
        result = engine.run()
    job.link = f"/vms/{result['vm_id']}"
    job.phase = "running; its data move in the background"
    return result
