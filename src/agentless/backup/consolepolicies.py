"""The backup console's policies and jobs.

- ``/policies``: the policies with their next run and last run; an admin creates,
  edits and deletes them (the checks are :meth:`~.policies.State.create_policy`'s, one
  line each), an operator runs one now (``run-now``: a run this daemon works on).
- ``/jobs``: the policies' runs from the state database (every worker's), and this
  daemon's console jobs; ``/jobs/{run}``: a run's VMs – outcome, worker, attempts,
  bytes – with the bytes of the VMs this worker backs up now pushed live;
  ``/jobs/console/{id}``: a console job's progress (bytes, rate, ETA) pushed live, its
  result or its error.

Live pages follow server-sent events (:func:`agentless.console.event_stream`), never a
reload loop: ``/jobs/{run}/events`` reads the run's rows once a second (one query) and
``/jobs/console/{id}/events`` the job in memory twice a second.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Mapping
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from agentless.console import Console, Session, event_stream
from agentless.console.live import Snapshot
from agentless.units import format_size

from .consolesite import ConsoleSite, problem
from .consolework import Busy, ConsoleJob
from .errors import PolicyError
from .policies import Policy, Run
from .prune import RULES

__all__ = ["add_pages", "job_fields"]

RUN_LINK_SECONDS = 10.0  # how long "run now" waits for its run's record before showing the job


def add_pages(console: Console, site: ConsoleSite) -> None:
    """Add the policies' and jobs' pages to *console*."""
    reader, operator, admin = console.page("read"), console.action("operate"), console.action("admin")
    author = console.page("admin")

    @console.router.get("/policies", response_class=HTMLResponse)
    def policies(request: Request, session: Session = Depends(reader)) -> Response:
        found = site.state.policies()
        latest = site.state.last_runs()
        rows = [(p, _utc(p.next_run()), latest.get(p.name)) for p in found]
        return console.render(request, session, "backup/policies.html", heading="Policies", rows=rows)

    @console.router.get("/policies/new", response_class=HTMLResponse)
    def new_policy(request: Request, session: Session = Depends(author)) -> Response:
        return _form(console, request, session, site, None, {})

    @console.router.get("/policies/{name}/edit", response_class=HTMLResponse)
    def edit_policy(request: Request, name: str, session: Session = Depends(author)) -> Response:
        try:
            policy = site.state.policy(name)
        except PolicyError as error:
            return problem(console, request, session, 404, str(error))
        return _form(console, request, session, site, policy, {})

    @console.router.post("/policies")
    async def create(request: Request, session: Session = Depends(admin)) -> Response:
        form = await request.form()
        fields = {key: str(value) for key, value in form.items() if isinstance(value, str)}
        try:
            settings = _settings(fields, site)
            site.state.create_policy(fields.get("name", "").strip(), **settings)
        except (PolicyError, ValueError) as error:
            return _form(console, request, session, site, None, fields, str(error), 400)
        site.log(f"console: {session.identity.name} created policy {fields['name'].strip()}")
        return RedirectResponse("/policies", status_code=303)

    @console.router.post("/policies/{name}")
    async def update(request: Request, name: str, session: Session = Depends(admin)) -> Response:
        form = await request.form()
        fields = {key: str(value) for key, value in form.items() if isinstance(value, str)}
        try:
            policy = site.state.policy(name)
        except PolicyError as error:
            return problem(console, request, session, 404, str(error))
        try:
            site.state.update_policy(name, **_settings(fields, site))
        except (PolicyError, ValueError) as error:
            return _form(console, request, session, site, policy, fields, str(error), 400)
        site.log(f"console: {session.identity.name} changed policy {name}")
        return RedirectResponse("/policies", status_code=303)

    @console.router.post("/policies/{name}/delete")
    def delete(request: Request, name: str, session: Session = Depends(admin)) -> Response:
        try:
            site.state.delete_policy(name)
        except PolicyError as error:
            return problem(console, request, session, 404, str(error))
        site.log(f"console: {session.identity.name} deleted policy {name}")
        return RedirectResponse("/policies", status_code=303)

    @console.router.post("/policies/{name}/run")
    def run_now(request: Request, name: str, session: Session = Depends(operator)) -> Response:
        try:
            policy = site.state.policy(name)
        except PolicyError as error:
            return problem(console, request, session, 404, str(error))
        opened = threading.Event()

        def work(job: ConsoleJob) -> Mapping[str, Any]:
            def follow(run_id: int) -> None:
                job.link = f"/jobs/{run_id}"
                opened.set()

            job.phase = "running the policy"
            run = site.scheduler.runner.run(policy, "manual", opened=follow)
            opened.set()
            if run is None:
                raise PolicyError("another worker made this run")
            if run.state != "succeeded":
                raise PolicyError(f"run {run.id} {run.state}: {run.error or 'a VM failed (see the run)'}")
            return {"run": run.id, "state": run.state}

        try:
            job = site.board.start("run", f"run of policy {name}", session.identity.name, work)
        except Busy as error:
            return problem(console, request, session, 429, str(error))
        opened.wait(RUN_LINK_SECONDS)
        return RedirectResponse(job.link or f"/jobs/console/{job.id}", status_code=303)

    @console.router.get("/jobs", response_class=HTMLResponse)
    def jobs(request: Request, policy: str = "", session: Session = Depends(reader)) -> Response:
        runs = site.state.runs(policy or None, limit=50)
        board = site.board.jobs()
        return console.render(
            request, session, "backup/jobs.html", heading="Jobs", runs=runs, board=board, policy=policy
        )

    @console.router.get("/jobs/console/{job_id}", response_class=HTMLResponse)
    def console_job(request: Request, job_id: int, session: Session = Depends(reader)) -> Response:
        job = site.board.get(job_id)
        if job is None:
            detail = f"no console job {job_id} on this worker (it restarted?)"
            return problem(console, request, session, 404, detail)
        return console.render(
            request, session, "backup/console_job.html", heading=job.title, job=job, fields=job_fields(job)
        )

    @console.router.get("/jobs/console/{job_id}/events")
    def console_job_events(request: Request, job_id: int, session: Session = Depends(reader)) -> Response:
        job = site.board.get(job_id)
        if job is None:
            return Response(status_code=404)

        def poll() -> Snapshot:
            return job_fields(job), job.state != "running"

        return event_stream(request, poll)

    @console.router.get("/jobs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: int, session: Session = Depends(reader)) -> Response:
        try:
            run = site.state.run(run_id)
        except PolicyError as error:
            return problem(console, request, session, 404, str(error))
        fields = _run_fields(site, run)
        return console.render(
            request, session, "backup/run.html", heading=f"Run {run.id}", run=run, fields=fields
        )

    @console.router.get("/jobs/{run_id}/events")
    def run_events(request: Request, run_id: int, session: Session = Depends(reader)) -> Response:
        def poll() -> Snapshot:
            run = site.state.run(run_id)
            return _run_fields(site, run), run.state != "running"

        return event_stream(request, poll, interval=1.0)


def _utc(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat()


def _form(
    console: Console,
    request: Request,
    session: Session,
    site: ConsoleSite,
    policy: Policy | None,
    given: Mapping[str, str],
    error: str = "",
    status: int = 200,
) -> Response:
    """The policy form: *policy*'s settings (None: a new one), or what was *given*."""
    if given:
        values = dict(given)
    elif policy is not None:
        values = {
            "name": policy.name,
            "vms": "" if policy.all_vms else " ".join(policy.vms),
            "all": "1" if policy.all_vms else "",
            "schedule": policy.schedule,
            "type": policy.type,
            "full_every": str(policy.full_every or ""),
            "offline": "1" if policy.offline else "",
            "repo": policy.repo,
            "copy_to": policy.copy_to or "",
        } | {f"keep_{rule}": str(policy.keep.get(f"keep_{rule}", "") or "") for rule in RULES}
    else:
        values = {"schedule": "0 2 * * *", "type": "incremental", "repo": site.default_repo or ""}
    return console.render(
        request,
        session,
        "backup/policy_form.html",
        status,
        heading=f"Edit policy {policy.name}" if policy else "New policy",
        policy=policy,
        values=values,
        rules=RULES,
        error=error,
        repositories=site.repositories(),
    )


def _count(text: str, what: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what}: a whole number, not {text!r}") from None


def _settings(fields: Mapping[str, str], site: ConsoleSite) -> dict[str, Any]:
    """The form's fields as :meth:`~.policies.State.create_policy`'s settings; ValueError
    (one line) for what the form cannot say. The repositories must be ones this daemon
    already knows or exist (the CLI checks the same)."""
    repo = fields.get("repo", "").strip()
    if not repo:
        raise ValueError("give the repository")
    copy_to = fields.get("copy_to", "").strip() or None
    keep = {}
    for rule in RULES:
        count = _count(fields.get(f"keep_{rule}", ""), f"keep {rule}")
        if count:
            keep[f"keep_{rule}"] = count
    return {
        "vms": fields.get("vms", "").replace(",", " ").split(),
        "all_vms": bool(fields.get("all")),
        "schedule": fields.get("schedule", "").strip(),
        "type": fields.get("type", "incremental"),
        "full_every": _count(fields.get("full_every", ""), "full every"),
        "keep": keep,
        "offline": bool(fields.get("offline")),
        "repo": repo,
        "copy_to": copy_to,
    }


def job_fields(job: ConsoleJob) -> dict[str, dict[str, Any]]:
    """What a console job's page shows, by element id (its live updates' snapshot)."""
    eta = job.eta()
    fields: dict[str, dict[str, Any]] = {
        "job-progress": {"value": job.done, "max": max(job.size, 1) if job.size else 1},
        "job-percent": {"text": f"{job.percent()} %"},
        "job-bytes": {"text": f"{format_size(job.done)} of {format_size(job.size)}" if job.size else "–"},
        "job-rate": {"text": f"{format_size(int(job.rate()))}/s" if job.done else "–"},
        "job-eta": {"text": f"{eta:.0f} s" if eta is not None else "–"},
        "job-phase": {"text": job.phase or "–"},
        "job-state": {"text": job.state, "state": job.state},
        "job-error": {"text": job.error, "hidden": not job.error},
        "job-ended": {"time": job.ended.isoformat()} if job.ended else {"text": "–"},
        "job-link": {
            "href": job.link or "#",
            "text": f"See what it made: {job.link}",
            "hidden": not job.link,
        },
    }
    if job.state == "succeeded" and not job.size:
        fields["job-progress"] = {"value": 1, "max": 1}
    return fields


def _run_fields(site: ConsoleSite, run: Run) -> dict[str, dict[str, Any]]:
    """What a run's page shows, by element id: the run's state and each VM's row, with
    the bytes of those this worker backs up now."""
    live = site.scheduler.runner.live()
    fields: dict[str, dict[str, Any]] = {"run-state": {"text": run.state, "state": run.state}}
    for vm in run.vms:
        done, size = live.get(vm.id, (vm.read, vm.read)) if vm.outcome == "running" else (vm.read, vm.read)
        finished = vm.outcome == "succeeded"
        fields[f"vm-{vm.id}-outcome"] = {"text": vm.outcome, "state": vm.outcome}
        fields[f"vm-{vm.id}-progress"] = {"value": size if finished else done, "max": max(size, 1)}
        fields[f"vm-{vm.id}-bytes"] = {"text": format_size(done)}
        fields[f"vm-{vm.id}-worker"] = {"text": vm.worker or "–"}
        fields[f"vm-{vm.id}-attempts"] = {"text": str(vm.attempts)}
        fields[f"vm-{vm.id}-error"] = {"text": vm.error or ""}
    return fields
