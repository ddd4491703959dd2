"""The backup console's restore points and repositories: ``/points`` (newest first, by
VM, :data:`PER_PAGE` a page), ``/points/{id}`` (a point's VM, disks, NICs and what this
worker knows of its verification), ``/repositories`` (each known repository's usage) and
the repositories' upkeep – verify (``operate``), prune with a dry-run preview first and
gc (``admin``) – run as console jobs (:mod:`.consolework`) whose page is
``/jobs/console/{id}``. The file browser is :mod:`.consolefiles`.

**Which repository.** The default one, or the one a ``repo`` parameter names – only
among those the daemon knows (:meth:`.ConsoleSite.known_repository`): a request never
makes the console open another place.

**Pages from the catalog.** ``/points`` and the usage figures are queries of the
repository's local catalog (:mod:`.catalog`: a page of 50 rows, the VMs' choices, the
totals – never every point, never a restore point fetched), synced with the repository's
``points/`` names at most once a minute (:meth:`.ConsoleSite.catalog`). The prune preview
alone lists the repository every time: what it shows is what a prune would remove.

**Usage figures, cheaply** (:func:`repository_usage`). Restore points and their logical
size are the catalog's totals; blobs and stored bytes from the local index
cache (:mod:`.indexcache`: one listing of ``index/`` names to sync it). The cache's runs
are immutable files, so each run's bytes per pack row are summed once per process (one
pass over its values with numpy) and remembered by the run's name; a view then costs a
sum over rows (packs), not over blobs. The dashboard and this page share the figures for
a minute (:meth:`.ConsoleSite.cached_usage`).

**Verify state.** A verify checks every restore point of its repository; this worker's
board keeps its recent console jobs (not across restarts), so a point's page shows the
last verify job of this worker over its repository started after the point was made –
or says that none has run since the daemon started.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from fastapi import Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from agentless.console import Console, Session

from . import consolefiles
from .catalog import Brief, Catalog
from .consolesite import ConsoleSite, problem
from .consolework import Busy, ConsoleJob
from .errors import VmbackupError
from .gc import gc
from .indexcache import IndexCache, Run
from .prune import KEEP, RULES, prune, select
from .storage import StorageError
from .verify import verify

__all__ = ["PER_PAGE", "SHOWN", "add_pages", "index_totals", "points_page", "repository_usage", "selection"]

PER_PAGE = 50  # restore points a page of /points shows
SHOWN = 200  # restore points a prune preview lists of those it keeps
_RUN_BYTES_KEPT = 64  # runs whose per-row sums are remembered
_run_bytes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
_run_bytes_lock = threading.Lock()
_EXPECTED = (VmbackupError, StorageError, KeyError, ValueError, OSError)


# ---------------------------------------------------------------------- usage


def _row_sums(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(stored bytes, raw bytes) of each pack row of *run*, summed once per run (runs
    never change under their name)."""
    with _run_bytes_lock:
        known = _run_bytes.get(run.name)
    if known is not None:
        return known
    values = run.values
    rows = values["pack"].astype(np.int64)
    stored = np.bincount(rows, weights=values["length"].astype(np.float64), minlength=len(run.rows))
    raw = np.bincount(
        rows, weights=(values["raw"] & np.uint32((1 << 31) - 1)).astype(np.float64), minlength=len(run.rows)
    )
    sums = (stored.astype(np.int64), raw.astype(np.int64))
    with _run_bytes_lock:
        if len(_run_bytes) >= _RUN_BYTES_KEPT:
            _run_bytes.pop(next(iter(_run_bytes)))
        _run_bytes[run.name] = sums
    return sums


def index_totals(index: IndexCache) -> tuple[int, int, int]:
    """(blobs, stored bytes, raw bytes) of the live entries of *index* (synced). A blob
    indexed twice (two backups stored it at once, before gc) counts twice: the figure is
    what the index files list, as the packs hold it."""
    blobs = stored = raw = 0
    for run in index.runs:
        live = ~run.dead_rows
        row_stored, row_raw = _row_sums(run)
        blobs += int(run.row_count[live].sum())
        stored += int(row_stored[live].sum())
        raw += int(row_raw[live].sum())
    return blobs, stored, raw


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 2) if denominator else None


def repository_usage(site: ConsoleSite, location: str) -> dict[str, Any]:
    """The usage figures of the repository at *location* (a known one): ``points``,
    ``logical`` (the points' disk sizes summed: what restoring all would write),
    ``blobs``, ``raw`` (their uncompressed bytes), ``stored`` (bytes in packs), and the
    ratios ``dedup`` (logical / raw), ``compression`` (raw / stored) and ``total``
    (logical / stored). KeyError for a repository the console does not know."""
    with site.repository(location) as repository:
        points, vms, logical = site.catalog(repository).totals()
        blobs, stored, raw = index_totals(repository.index())
    return {
        "points": points,
        "vms": vms,
        "logical": logical,
        "blobs": blobs,
        "raw": raw,
        "stored": stored,
        "dedup": _ratio(logical, raw),
        "compression": _ratio(raw, stored),
        "total": _ratio(logical, stored),
        "computed": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------- work


def _verify_work(site: ConsoleSite, location: str | None, read_data: bool) -> Any:
    def work(job: ConsoleJob) -> Mapping[str, Any]:
        def progress(phase: str, done: int, total: int) -> None:
            job.phase = f"{phase} {done}/{total}"  # counts of points or packs: size/done are bytes

        with site.repository(location) as repository, repository.lock("shared", "console verify"):
            report = verify(repository, read_data=read_data, progress=progress)
            where = repository.backend.location
        job.phase = "done"
        return {
            "repo": location or site.default_repo,
            "location": where,
            "read_data": read_data,
            "points": report.points,
            "blobs": report.blobs,
            "packs": report.packs,
            "problems": report.problems,
            "affected": report.affected,
            "notices": report.notices,
            "ok": report.ok,
        }

    return work


def selection(point_ids: Iterable[str]) -> str:
    """What a prune preview showed, in one form field: a digest of the ids it would
    remove (the confirmation carries it, not thousands of ids)."""
    return hashlib.sha256(" ".join(sorted(point_ids)).encode()).hexdigest()[:32]


def _prune_work(site: ConsoleSite, location: str | None, rules: dict[str, Any], expected: str) -> Any:
    def work(job: ConsoleJob) -> Mapping[str, Any]:
        job.phase = "selecting"
        with site.repository(location) as repository:
            preview = prune(repository, **rules, dry_run=True)
            if selection(point.id for point, _ in preview.remove) != expected:
                raise VmbackupError(
                    f"the restore points these rules remove changed since the preview "
                    f"({len(preview.remove)} now): nothing removed, preview again"
                )
            job.phase = "removing"
            report = prune(repository, **rules)
        return {"repo": location or site.default_repo, "removed": report.removed, "held": report.held}

    return work


def _gc_work(site: ConsoleSite, location: str | None) -> Any:
    def work(job: ConsoleJob) -> Mapping[str, Any]:
        job.phase = "collecting"
        with site.repository(location) as repository:
            report = gc(repository)
        result = dataclasses.asdict(report)
        return {
            "repo": location or site.default_repo,
            "packs deleted": len(report.deleted) + len(report.orphans),
            "bytes freed": report.bytes_freed,
            "repacked": len(report.repacked),
            "condemned": len(report.condemned),
            "waiting": len(report.waiting),
        } | {"held": result["held"]}

    return work


def _rules(form: Mapping[str, Any]) -> dict[str, Any]:
    """The retention rules of a prune form (an empty field: 0), as :func:`.prune.prune`'s
    keyword arguments; :class:`.consolefiles.BadRequest` for anything else."""
    rules: dict[str, Any] = {}
    for name in KEEP:
        text = str(form.get(name) or "0").strip()
        if not text.lstrip("-").isdigit() or int(text) < -1 or int(text) > 100_000:
            raise consolefiles.BadRequest(f"{name.replace('_', '-')}: give a whole number (-1: all)")
        rules[name] = int(text)
    if not any(rules.values()):
        raise consolefiles.BadRequest(
            "give at least one retention rule: without one prune removes every point"
        )
    return rules


def last_verify(site: ConsoleSite, location: str | None, since: str) -> ConsoleJob | None:
    """The newest verify job of this worker over *location* (None: the default) started
    after *since* (a point's time) – the last that covered that point."""
    where = location or site.default_repo
    made = _moment(since)
    for job in site.board.jobs():
        if (
            job.kind == "verify"
            and job.title.endswith(f" of {where}")
            and (made is None or job.started > made)
        ):
            return job
    return None


def _moment(text: str) -> datetime.datetime | None:
    """An ISO-8601 time as an aware datetime (UTC when it names no zone; None: not one)."""
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)


# ---------------------------------------------------------------------- the pages


def _status(error: BaseException) -> tuple[int, str]:
    if isinstance(error, Busy):
        return 409, str(error)
    return consolefiles.status_of(error)


def points_page(
    catalog: Catalog, vm: str, page: int, per_page: int = PER_PAGE
) -> tuple[list[Brief], int, int, int]:
    """(the points shown, how many match, pages, the page shown) of *catalog* for a VM
    (its id or name; empty: every VM), newest first (:meth:`.Catalog.page`: by time, as
    every point writes it – UTC, microseconds –, then id), *per_page* a page; a page out
    of range shows the nearest (read again: the count comes with a page)."""
    page = max(1, page)
    shown, total = catalog.page(vm, (page - 1) * per_page, per_page)
    pages = max(1, math.ceil(total / per_page))
    if page > pages:
        page = pages
        shown, total = catalog.page(vm, (page - 1) * per_page, per_page)
    return shown, total, pages, page


def add_pages(console: Console, site: ConsoleSite) -> None:
    """Add the restore points' and repositories' pages (and :mod:`.consolefiles`') to
    *console*."""
    reader = console.page("read")
    operator = console.action("operate")
    admin = console.action("admin")

    def where(repo: str) -> str | None:
        return site.known_repository(repo) if repo else None

    @console.router.get("/points", response_class=HTMLResponse)
    def points(
        request: Request, repo: str = "", vm: str = "", page: int = 1, session: Session = Depends(reader)
    ) -> Response:
        try:
            with site.repository(where(repo)) as repository:
                catalog = site.catalog(repository)
                vms = catalog.vms()
                shown, total, pages, page = points_page(catalog, vm, page)
                summaries = catalog.summaries_of(b.id for b in shown)
        except _EXPECTED as error:
            return problem(console, request, session, *_status(error))
        consistency = {i: summary.consistency for i, summary in summaries.items()}
        return console.render(
            request,
            session,
            "backup/points.html",
            heading="Restore points",
            points=shown,
            consistency=consistency,
            total=total,
            page=page,
            pages=pages,
            vm=vm,
            vms=vms,
            repo=repo,
            repos=site.repositories(),
            default=site.default_repo,
        )

    @console.router.get("/points/{point_id}", response_class=HTMLResponse)
    def point(
        request: Request, point_id: str, repo: str = "", session: Session = Depends(reader)
    ) -> Response:
        try:
            with site.repository(where(repo)) as repository:
                resolved = repository.resolve_point(point_id)  # its id, or a unique prefix's
                summary = repository.catalog().summaries_of([resolved]).get(resolved)
                found = summary or repository.load_point(resolved).summary()  # not yet in the catalog
        except _EXPECTED as error:
            return problem(console, request, session, *_status(error))
        job = last_verify(site, where(repo), found.time)
        return console.render(
            request,
            session,
            "backup/point.html",
            heading=f"Restore point {found.id}",
            point=found,
            repo=repo,
            verified=job,
            affected=job is not None and found.id in job.result.get("affected", []),
        )

    @console.router.get("/repositories", response_class=HTMLResponse)
    def repositories(request: Request, session: Session = Depends(reader)) -> Response:
        found = []
        for location in site.repositories():
            try:
                figures = site.cached_usage(location, functools.partial(repository_usage, site, location))
                found.append({"repo": location, **figures})
            except _EXPECTED as error:  # a repository away is shown, not a failed page
                found.append({"repo": location, "error": str(error) or type(error).__name__})
        return console.render(
            request,
            session,
            "backup/repositories.html",
            heading="Repositories",
            repositories=found,
            default=site.default_repo,
            rules=RULES,
        )

    def started(request: Request, session: Session, kind: str, title: str, work: Any) -> Response:
        try:
            job = site.board.start(kind, title, session.identity.name, work)
        except Busy as error:
            return problem(console, request, session, 409, str(error))
        return RedirectResponse(f"{console.prefix}/jobs/console/{job.id}", status_code=303)

    @console.router.post("/repositories/verify")
    def verify_now(
        request: Request,
        repo: str = Form(""),
        read_data: str = Form(""),
        session: Session = Depends(operator),
    ) -> Response:
        try:
            location = where(repo)
        except KeyError as error:
            return problem(console, request, session, *_status(error))
        name = location or site.default_repo
        if name is None:
            return problem(console, request, session, 404, "no default repository")
        what = "data and structure" if read_data else "structure"
        work = _verify_work(site, location, bool(read_data))
        return started(request, session, "verify", f"verify {what} of {name}", work)

    @console.router.post("/repositories/prune/preview", response_class=HTMLResponse)
    async def prune_preview(request: Request, session: Session = Depends(admin)) -> Response:
        form = await request.form()
        try:
            location = where(str(form.get("repo") or ""))
            rules = _rules(form)
            with site.repository(location) as repository:
                keep, remove = select(repository.briefs(), **rules)
        except (consolefiles.BadRequest, *_EXPECTED) as error:
            return problem(console, request, session, *_status(error))
        return console.render(
            request,
            session,
            "backup/_prune_preview.html",
            heading="Prune preview",
            repo=location or "",
            name=location or site.default_repo,
            rules=rules,
            keep=keep[:SHOWN],
            kept=len(keep),
            remove=remove,
            selection=selection(point.id for point, _ in remove),
            whole="hx-request" not in request.headers,
        )

    @console.router.post("/repositories/prune")
    async def prune_now(request: Request, session: Session = Depends(admin)) -> Response:
        form = await request.form()
        try:
            location = where(str(form.get("repo") or ""))
            rules = _rules(form)
        except (consolefiles.BadRequest, KeyError) as error:
            return problem(console, request, session, *_status(error))
        expected = str(form.get("selection") or "")
        name = location or site.default_repo
        shown = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in rules.items() if v)
        work = _prune_work(site, location, rules, expected)
        return started(request, session, "prune", f"prune ({shown}) of {name}", work)

    @console.router.post("/repositories/gc")
    def gc_now(request: Request, repo: str = Form(""), session: Session = Depends(admin)) -> Response:
        try:
            location = where(repo)
        except KeyError as error:
            return problem(console, request, session, *_status(error))
        return started(
            request, session, "gc", f"gc of {location or site.default_repo}", _gc_work(site, location)
        )

    consolefiles.add_pages(console, site)
