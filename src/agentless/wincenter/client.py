"""The typed client of the WinCenter REST API – what backup systems (and tests) use.

HTTPS with the center's CA pinned: the client trusts exactly the CA certificate it was
given (``D/pki/ca-cert.pem`` of ``wincenter init``) and checks that the server's
certificate, issued by it, names the host in *base_url*. The token goes as a bearer
token. Answers are the models of :mod:`.schemas`.

Errors::

    CenterError               base
     ├── CenterApiError       the center answered with an error: status, title, detail
     │                        (problem+json); retrying the same request gets the same
     │                        answer, except for 503
     └── CenterUnreachable    no answer (down, wrong address, certificate mismatch,
                              timeout); the request may or may not have been done
"""

from __future__ import annotations

import ssl
import time
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from agentless.lifetime import Closing

from .schemas import API_PREFIX, AuditPage, TaskOut, TaskPage, TokenCreated, TokenList, TokenOut, WhoAmI

__all__ = ["CenterApiError", "CenterClient", "CenterError", "CenterUnreachable"]

M = TypeVar("M", bound=BaseModel)
ENDED_STATES = frozenset({"succeeded", "failed", "aborted", "expired"})


class CenterError(Exception):
    """Base of the client's errors."""


class CenterApiError(CenterError):
    """The center refused a request: ``status`` (HTTP), ``title``, ``detail``, and the
    whole problem body in ``problem``."""

    def __init__(self, status: int, title: str, detail: str, problem: dict[str, Any] | None = None):
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.title = title
        self.detail = detail
        self.problem = problem or {}


class CenterUnreachable(CenterError):
    """No answer from the center (down, wrong address, certificate mismatch, timeout)."""


def ca_context(ca_cert_pem: str | bytes) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting only *ca_cert_pem*, host names checked."""
    pem = ca_cert_pem.decode() if isinstance(ca_cert_pem, bytes) else ca_cert_pem
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=pem)
    return context


class CenterClient(Closing):
    """One center: ``CenterClient("https://wincenter:9443", token, ca_cert_pem)``."""

    def __init__(self, base_url: str, token: str, ca_cert_pem: str | bytes, timeout: float = 60.0):
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + API_PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            verify=ca_context(ca_cert_pem),
            timeout=timeout,
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request under ``/api/v1``: the JSON answer, or CenterApiError /
        CenterUnreachable. For routes this class has no method for yet."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise CenterUnreachable(f"{self._http.base_url}: {error}") from error
        if response.status_code >= 400:
            try:
                body = response.json()
                if not isinstance(body, dict):
                    raise ValueError(body)
                title, detail = str(body.get("title", response.reason_phrase)), str(body.get("detail", ""))
            except ValueError:
                body, title, detail = None, response.reason_phrase, response.text[:200]
            raise CenterApiError(response.status_code, title, detail, body)
        return response.json()

    def _model(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        data = self.call(method, path, **kwargs)
        try:
            return model.model_validate(data)
        except ValidationError as error:
            raise CenterApiError(200, "Unexpected answer", f"not a {model.__name__}: {error}") from None

    # ------------------------------------------------------------------ identity, tokens, audit

    def whoami(self) -> WhoAmI:
        return self._model(WhoAmI, "GET", "/whoami")

    def list_tokens(self) -> list[TokenOut]:
        return self._model(TokenList, "GET", "/tokens").tokens

    def create_token(self, role: str, name: str | None = None) -> TokenCreated:
        """A new token (``.token`` is its secret, shown this once). Admins only."""
        return self._model(TokenCreated, "POST", "/tokens", json={"role": role, "name": name})

    def revoke_token(self, token_id: int) -> TokenOut:
        return self._model(TokenOut, "DELETE", f"/tokens/{token_id}")

    def audit(self, limit: int = 100, offset: int = 0) -> AuditPage:
        return self._model(AuditPage, "GET", "/audit", params={"limit": limit, "offset": offset})

    # ------------------------------------------------------------------ tasks

    def tasks(
        self,
        state: str | list[str] | None = None,
        kind: str | list[str] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> TaskPage:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        if kind:
            params["kind"] = kind
        return self._model(TaskPage, "GET", "/tasks", params=params)

    def task(self, task_id: str) -> TaskOut:
        return self._model(TaskOut, "GET", f"/tasks/{task_id}")

    def wait_task(
        self,
        task_id: str,
        until: frozenset[str] | set[str] = ENDED_STATES | {"ready"},
        timeout: float = 3600.0,
        poll: float = 0.5,
    ) -> TaskOut:
        """Poll the task until its state is one of *until* (default: ready or ended);
        TimeoutError after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while True:
            task = self.task(task_id)
            if task.state in until:
                return task
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} still {task.state} after {timeout:.0f} s")
            time.sleep(poll)

    def close(self) -> None:
        self._http.close()
