"""WinCenter's problem+json answers: :mod:`agentless.problems` (shared with the host API),
with :class:`~.errors.WinCenterError` mapped to its class's ``status`` and ``title``, and
every problem's summary kept for the audit log (:func:`.audit.set_problem`)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from agentless import problems as shared
from agentless.problems import PROBLEM_RESPONSES, Problem, problem_doc

from .audit import set_problem
from .errors import WinCenterError

__all__ = ["PROBLEM_RESPONSES", "Problem", "install", "problem_doc", "problem_response"]


def problem_response(
    request: Request,
    status: int,
    title: str,
    detail: str = "",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The problem+json answer (and the audit log's summary of it)."""
    set_problem(request, title, detail)
    return shared.problem_response(request, status, title, detail, headers)


def _status_of(error: Exception) -> tuple[int, str]:
    assert isinstance(error, WinCenterError)
    return error.status, error.title


def install(app: FastAPI) -> None:
    """Register the handlers that answer every failure of *app* with a problem, and
    document them as such."""
    shared.install(app, {WinCenterError: _status_of}, on_problem=set_problem)
