"""The console's task pages: the list (newest first, a ``<progress>`` per task) and one
task, both followed live.

A page of tasks holds ``data-live`` pointing at its stream of server-sent events
(:func:`agentless.console.event_stream`): every half second the stream reads the same
tasks again and pushes what changed – progress, state, the time of the last change –
and ``console.js`` writes it into the page; no reload, no polling from the page. The
stream ends once every task it follows has ended (a finished task changes no more).

==========================================  ========  ==================================
``GET /console/tasks[?offset=]``            read      ``GET /api/v1/tasks``
``GET /console/tasks/live[?offset=]``       read      its live progress (SSE)
``GET /console/tasks/{id}``                 read      ``GET /api/v1/tasks/{id}``
``GET /console/tasks/{id}/live``            read      its live progress (SSE)
==========================================  ========  ==================================

A task's result is not shown: a backup's result holds the disks' access info, whose
export names are credentials (the API shows them only to the token that started the
task and to admins); the console needs none of it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import Response

from agentless.console import Session, event_stream

from ..errors import NotFoundError, WinCenterError
from ..tasks import Task
from .site import WinCenterConsole, iso, number, size

__all__ = ["PAGE", "add_routes", "fields"]

PAGE = 50  # tasks per page


def _done_text(task: Task) -> str:
    if task.size <= 0:
        return f"{size(task.done)} done"
    return f"{size(task.done)} of {size(task.size)} ({task.percent:.0f} %)"


def fields(task: Task, key: str) -> dict[str, Mapping[str, Any]]:
    """What the page shows of *task*, by element id (``KEY-progress``, ``KEY-state``,
    ``KEY-done``, ``KEY-updated``, ``KEY-error``): the snapshot a stream pushes."""
    done = task.size if task.state.value == "succeeded" else task.done
    return {
        f"{key}-progress": {"value": done, "max": max(task.size, 1)},
        f"{key}-state": {"text": task.state.value, "state": task.state.value},
        f"{key}-done": {"text": _done_text(task)},
        f"{key}-updated": {"time": iso(task.updated), "text": iso(task.updated)},
        f"{key}-error": {"text": f"{task.error.title}: {task.error.detail}" if task.error else ""},
    }


def _task_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise NotFoundError(f"no task {text[:60]!r} (a task id is a UUID)") from None


def add_routes(site: WinCenterConsole) -> None:
    """Add the task pages to *site*'s console."""
    console = site.console
    router = console.router
    tasks = site.center.tasks
    reader = console.page("read")

    @router.get("/tasks")
    def task_list(request: Request, offset: str = "", session: Session = Depends(reader)) -> Response:
        try:
            start = number(offset, "offset")
        except WinCenterError as error:
            return site.failed(request, session, error, f"{site.prefix}/tasks")
        found, total = tasks.page(limit=PAGE, offset=start)
        return site.render(
            request,
            session,
            "wincenter/tasks.html",
            heading="Tasks",
            tasks=found,
            total=total,
            offset=start,
            page=PAGE,
            live=any(not task.ended for task in found),
            done_text=_done_text,
        )

    @router.get("/tasks/live")
    def task_list_live(request: Request, offset: str = "", session: Session = Depends(reader)) -> Response:
        start = number(offset, "offset")

        def poll() -> tuple[dict[str, Mapping[str, Any]], bool]:
            found, _total = tasks.page(limit=PAGE, offset=start)
            snapshot: dict[str, Mapping[str, Any]] = {}
            for task in found:
                snapshot.update(fields(task, f"t-{task.id}"))
            return snapshot, all(task.ended for task in found)

        return event_stream(request, poll)

    @router.get("/tasks/{task_id}")
    def task_page(task_id: str, request: Request, session: Session = Depends(reader)) -> Response:
        try:
            task = tasks.get(_task_id(task_id))
        except WinCenterError as error:
            return site.failed(request, session, error, f"{site.prefix}/tasks")
        return site.render(
            request,
            session,
            "wincenter/task.html",
            heading=f"Task {task.id}",
            task=task,
            done_text=_done_text,
        )

    @router.get("/tasks/{task_id}/live")
    def task_live(task_id: str, request: Request, session: Session = Depends(reader)) -> Response:
        known = tasks.get(_task_id(task_id)).id

        def poll() -> tuple[dict[str, Mapping[str, Any]], bool]:
            task = tasks.get(known)
            return fields(task, "task"), task.ended

        return event_stream(request, poll)
