"""Every error the API answers is RFC 9457 ``application/problem+json``.

One place turns each kind of failure into a :class:`~.schemas.Problem`:

==================================  =========================================
:class:`Problem` (raised by routes)  its status, title, detail
:class:`~.errors.WinCenterError`    its class's ``status`` and ``title``; the message
Starlette's HTTPException           404 unknown route, 405 wrong method...
RequestValidationError              422, with ``errors`` field by field
anything else                       500 "Internal Server Error" (the server logs the
                                    traceback; nothing of it leaks to the caller)
==================================  =========================================

:data:`PROBLEM_RESPONSES` documents these answers in the OpenAPI document, so that
clients (and schemathesis) know the error body.
"""

from __future__ import annotations

import http
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .audit import set_problem
from .errors import WinCenterError
from .schemas import Problem as ProblemBody

__all__ = ["PROBLEM_RESPONSES", "Problem", "install", "problem_doc", "problem_response"]

MEDIA_TYPE = "application/problem+json"


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
    **extra: Any,
) -> JSONResponse:
    """The problem+json answer (and the audit log's summary of it)."""
    set_problem(request, title, detail)
    body = ProblemBody(title=title, status=status, detail=detail, instance=request.url.path, **extra)
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


def install(app: FastAPI) -> None:
    """Register the handlers that answer every failure of *app* with a problem, and
    document them as such."""
    _document_problems(app)

    @app.exception_handler(Problem)
    async def on_problem(request: Request, error: Problem) -> JSONResponse:
        return problem_response(request, error.status, error.title, error.detail, error.headers)

    @app.exception_handler(WinCenterError)
    async def on_error(request: Request, error: WinCenterError) -> JSONResponse:
        return problem_response(request, error.status, error.title, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        title = _http_title(error.status_code)
        detail = error.detail if isinstance(error.detail, str) and error.detail != title else ""
        if error.status_code == 404 and not detail:
            detail = f"no such resource: {request.url.path}"
        return problem_response(request, error.status_code, title, detail, dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": [str(part) for part in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in error.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else str(first["msg"])
        return problem_response(request, 422, "Unprocessable Content", detail, errors=errors)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, _error: Exception) -> JSONResponse:
        # Starlette's ServerErrorMiddleware calls this, then re-raises: uvicorn logs the traceback
        return problem_response(
            request, 500, "Internal Server Error", "an unexpected failure; see the server log"
        )
