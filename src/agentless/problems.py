"""RFC 9457 problem details: how both REST APIs (WinCenter's and the host's) answer errors.

One place turns each kind of failure into an ``application/problem+json`` answer with a
:class:`~agentless.wire.Problem` body:

==================================  =========================================
:class:`Problem` (raised by routes)  its status, title, detail
a domain error in *errors*          the status and title its mapper gives
Starlette's HTTPException           404 unknown route, 405 wrong method...
RequestValidationError              422, with ``errors`` field by field
anything else                       500 "Internal Server Error" (the server logs the
                                    traceback; nothing of it leaks to the caller)
==================================  =========================================

:data:`PROBLEM_RESPONSES` documents these answers in an OpenAPI document, so that clients
(and schemathesis) know the error body; :func:`install` also moves every documented 4xx
and 5xx answer to the media type it is really sent with.
"""

from __future__ import annotations

import http
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .wire import Problem as ProblemBody

__all__ = [
    "MEDIA_TYPE",
    "PROBLEM_RESPONSES",
    "ErrorMapper",
    "OnProblem",
    "Problem",
    "install",
    "problem_doc",
    "problem_response",
]

MEDIA_TYPE = "application/problem+json"

ErrorMapper = Callable[[Exception], tuple[int, str]]
"""A domain error → its HTTP status and problem title (the detail is the error's text)."""

OnProblem = Callable[[Request, str, str], None]
"""Called with (request, title, detail) for every problem answered (e.g. the audit log)."""


class Problem(Exception):
    """Raise in a route to answer *status* with a problem body. *headers* are added
    (``WWW-Authenticate`` for 401)."""

    def __init__(self, status: int, title: str, detail: str = "", headers: dict[str, str] | None = None):
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers


def problem_response(
    request: Request,
    status: int,
    title: str,
    detail: str = "",
    headers: dict[str, str] | None = None,
    errors: list[dict[str, object]] | None = None,
) -> JSONResponse:
    """The problem+json answer to *request*."""
    body = ProblemBody(title=title, status=status, detail=detail, instance=request.url.path, errors=errors)
    return JSONResponse(
        body.model_dump(exclude_none=True, mode="json"),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=headers,
    )


def problem_doc(description: str) -> dict[str, Any]:
    """An error answer for a route's ``responses=`` (documented as problem+json)."""
    return {"description": description, "model": ProblemBody}


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem_doc("no token, an unknown one or a revoked one"),
    403: problem_doc("the token's role does not allow this"),
    422: problem_doc("the request is malformed (see errors)"),
    500: problem_doc("an unexpected failure (logged by the server)"),
}


def _http_title(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _document_problems(app: FastAPI) -> None:
    """FastAPI documents every ``model`` response as application/json; move the error
    answers (4xx, 5xx) to the media type they are really sent with."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = plain()
            for path in document.get("paths", {}).values():
                for operation in path.values():
                    for status, response in operation.get("responses", {}).items():
                        content = response.get("content", {})
                        if status[:1] in "45" and "application/json" in content:
                            content[MEDIA_TYPE] = content.pop("application/json")
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _validation_errors(error: RequestValidationError) -> list[dict[str, object]]:
    return [
        {
            "loc": [str(part) for part in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in error.errors()
    ]


def install(
    app: FastAPI,
    errors: Mapping[type[Exception], ErrorMapper] | None = None,
    on_problem: OnProblem | None = None,
) -> None:
    """Answer every failure of *app* with a problem, and document them as such.

    *errors* maps domain error classes to their status and title (the most specific class
    registered wins, as Starlette looks handlers up along the error's MRO); *on_problem*
    hears of every problem answered."""

    def answer(
        request: Request,
        status: int,
        title: str,
        detail: str = "",
        headers: dict[str, str] | None = None,
        errors: list[dict[str, object]] | None = None,
    ) -> JSONResponse:
        if on_problem is not None:
            on_problem(request, title, detail)
        return problem_response(request, status, title, detail, headers, errors)

    _document_problems(app)

    @app.exception_handler(Problem)
    async def on_raised(request: Request, error: Problem) -> JSONResponse:
        return answer(request, error.status, error.title, error.detail, error.headers)

    for kind, mapper in (errors or {}).items():

        async def on_domain(request: Request, error: Exception, mapper: ErrorMapper = mapper) -> JSONResponse:
            status, title = mapper(error)
            return answer(request, status, title, str(error))

        app.add_exception_handler(kind, on_domain)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        title = _http_title(error.status_code)
        detail = error.detail if isinstance(error.detail, str) and error.detail != title else ""
        if error.status_code == 404 and not detail:
            detail = f"no such resource: {request.url.path}"
        return answer(request, error.status_code, title, detail, dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        found = _validation_errors(error)
        first = found[0] if found else {"loc": [], "msg": "invalid request"}
        where = first["loc"]
        detail = str(first["msg"])
        if isinstance(where, list) and where:
            detail = f"{'.'.join(map(str, where))}: {detail}"
        return answer(request, 422, "Unprocessable Content", detail, errors=found)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, _error: Exception) -> JSONResponse:
        # Starlette's ServerErrorMiddleware calls this, then re-raises: uvicorn logs the traceback
        return answer(request, 500, "Internal Server Error", "an unexpected failure; see the server log")
