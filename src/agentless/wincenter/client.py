"""The typed client of the WinCenter REST API – what backup systems (and tests) use.

HTTPS with the center's CA pinned: the client trusts exactly the CA certificate it was
given (``D/pki/ca-cert.pem`` of ``wincenter init``) and checks that the server's
certificate, issued by it, names the host in *base_url*. The token goes as a bearer
token. Answers are the models of :mod:`.schemas`, parsed here (an answer that does not
fit is a :class:`CenterApiError`): a task is a :class:`~.schemas.BackupTaskOut` or a
:class:`~.schemas.RestoreTaskOut` by its ``kind``, its ``result`` the kind's model.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from agentless.lifetime import Closing

from .schemas import (
    API_PREFIX,
    AuditPage,
    BackupOut,
    BackupPage,
    HostList,
    HostOut,
    PoolList,
    PoolOut,
    RestoreCreate,
    RestoreOut,
    RestorePage,
    RestoreTarget,
    TaskAccepted,
    TaskOut,
    TaskPage,
    TokenCreated,
    TokenList,
    TokenOut,
    VmCreate,
    VmOut,
    VmPage,
    VmSpec,
    WhoAmI,
)

__all__ = ["RESTORE_ENDED_STATES", "CenterApiError", "CenterClient", "CenterError", "CenterUnreachable"]

M = TypeVar("M", bound=BaseModel)
Params = Mapping[str, str | int | Sequence[str]]
_TASK: TypeAdapter[TaskOut] = TypeAdapter(TaskOut)
ENDED_STATES = frozenset({"succeeded", "failed", "aborted", "expired"})
RESTORE_ENDED_STATES = frozenset({"completed", "aborted", "failed"})


class CenterError(Exception):
    """Base of the client's errors."""


class CenterApiError(CenterError):
    """The center refused a request: ``status`` (HTTP), ``title``, ``detail``, and the
    whole problem body in ``problem``."""

    def __init__(self, status: int, title: str, detail: str, problem: dict[str, object] | None = None):
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

    def call(self, method: str, path: str, *, params: Params | None = None, json: object = None) -> object:
        """One request under ``/api/v1`` (query *params*, a *json* body): the JSON answer,
        or CenterApiError / CenterUnreachable. For routes this class has no method for yet."""
        try:
            response = self._http.request(method, path, params=params, json=json)
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

    def _model(
        self, model: type[M], method: str, path: str, *, params: Params | None = None, json: object = None
    ) -> M:
        data = self.call(method, path, params=params, json=json)
        try:
            return model.model_validate(data)
        except ValidationError as error:
            raise CenterApiError(200, "Unexpected answer", f"not a {model.__name__}: {error}") from None

    def _task(self, method: str, path: str, *, json: object = None) -> TaskOut:
        data = self.call(method, path, json=json)
        try:
            return _TASK.validate_python(data)
        except ValidationError as error:
            raise CenterApiError(200, "Unexpected answer", f"not a task: {error}") from None

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
        params: dict[str, str | int | Sequence[str]] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        if kind:
            params["kind"] = kind
        return self._model(TaskPage, "GET", "/tasks", params=params)

    def task(self, task_id: str) -> TaskOut:
        """The task: a BackupTaskOut or a RestoreTaskOut (by ``kind``)."""
        return self._task("GET", f"/tasks/{task_id}")

    def wait_task(
        self,
        task_id: str,
        until: frozenset[str] | set[str] = ENDED_STATES | {"ready"},
        timeout: float = 3600.0,
        poll: float = 0.5,
    ) -> TaskOut:
        """Poll the task until its state is one of *until* (default: ready or ended);
        TimeoutError after *timeout* seconds. Polls soon at first (10 ms), then less and
        less often, up to every *poll* seconds: short tasks answer fast, long ones cost
        few requests."""
        return _poll(lambda: self.task(task_id), until, timeout, poll, f"task {task_id}")

    # ------------------------------------------------------------------ inventory

    def register_host(self, url: str, token: str, cert_pem: str) -> HostOut:
        """Register a WinServer host (admins): its certificate is pinned from now on."""
        return self._model(HostOut, "POST", "/hosts", json={"url": url, "token": token, "cert": cert_pem})

    def hosts(self) -> list[HostOut]:
        return self._model(HostList, "GET", "/hosts").items

    def sync_host(self, ref: str) -> HostOut:
        return self._model(HostOut, "POST", f"/hosts/{_q(ref)}/sync")

    def pools(self, host: str | None = None) -> list[PoolOut]:
        return self._model(PoolList, "GET", "/pools", params={"host": host} if host else {}).items

    def vms(
        self,
        host: str | None = None,
        name: str | None = None,
        power_state: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> VmPage:
        filters = {"host": host, "name": name, "power_state": power_state}
        params: dict[str, str | int] = {k: v for k, v in filters.items() if v} | {
            "limit": limit,
            "offset": offset,
        }
        return self._model(VmPage, "GET", "/vms", params=params)

    def vm(self, ref: str) -> VmOut:
        """A VM by id (or unique name)."""
        return self._model(VmOut, "GET", f"/vms/{_q(ref)}")

    def create_vm(self, spec: VmCreate) -> VmOut:
        return self._model(VmOut, "POST", "/vms", json=spec.model_dump())

    def start_vm(self, ref: str) -> VmOut:
        return self._model(VmOut, "POST", f"/vms/{_q(ref)}/start")

    def stop_vm(self, ref: str) -> VmOut:
        return self._model(VmOut, "POST", f"/vms/{_q(ref)}/stop")

    def delete_vm(self, ref: str) -> VmOut:
        return self._model(VmOut, "DELETE", f"/vms/{_q(ref)}")

    # ------------------------------------------------------------------ backups and restores

    def start_backup(self, vm_id: str, backup_id: str, backup_type: str) -> TaskAccepted:
        """Seed backup step 1; then :meth:`wait_task` for ``ready`` (the result says what
        to read and how) and :meth:`complete_backup` (or :meth:`abort_backup`)."""
        body = {"vm_id": vm_id, "backup_id": backup_id, "type": backup_type}
        return self._model(TaskAccepted, "POST", "/backups", json=body)

    def backup(self, backup_id: str) -> BackupOut:
        return self._model(BackupOut, "GET", f"/backups/{_q(backup_id)}")

    def backups(self, vm: str | None = None, limit: int = 100, offset: int = 0) -> BackupPage:
        params: dict[str, str | int] = {"limit": limit, "offset": offset} | ({"vm": vm} if vm else {})
        return self._model(BackupPage, "GET", "/backups", params=params)

    def complete_backup(self, backup_id: str) -> TaskAccepted:
        return self._model(TaskAccepted, "POST", f"/backups/{_q(backup_id)}/complete")

    def abort_backup(self, backup_id: str) -> TaskAccepted:
        return self._model(TaskAccepted, "POST", f"/backups/{_q(backup_id)}/abort")

    def backup_progress(self, backup_id: str, done: int) -> TaskOut:
        return self._task("POST", f"/backups/{_q(backup_id)}/progress", json={"done": done})

    def start_restore(
        self,
        restore_id: str,
        vm: VmSpec,
        host: str | None = None,
        pool: str | None = None,
        *,
        start: bool = False,
        migration_rate_limit: int | None = None,
    ) -> TaskAccepted:
        """Seed restore step 1; then :meth:`wait_task` for ``ready`` (the result holds the
        new VM and each disk's write access) and :meth:`complete_restore`. With a source
        on every disk of *vm* an instant restore (:meth:`create_restore`)."""
        body = RestoreCreate(
            restore_id=restore_id,
            vm=vm,
            target=RestoreTarget(host=host, pool=pool),
            start=start,
            migration_rate_limit=migration_rate_limit,
        )
        return self.create_restore(body)

    def create_restore(self, body: RestoreCreate) -> TaskAccepted:
        """``POST /restores`` with *body*. With a source on every disk it is an instant
        restore: follow it with :meth:`restore` (or :meth:`wait_restore`) – ``migrating``
        once the VM exists (and runs, if ``start``), with its ``migration`` progress, then
        ``completed`` on its own; :meth:`abort_restore` deletes the VM. Fields left at
        their defaults are not sent (a center that predates them accepts the body)."""
        data = body.model_dump(mode="json", exclude_defaults=True)
        data["vm"] = body.vm.model_dump(mode="json", exclude_none=True)
        return self._model(TaskAccepted, "POST", "/restores", json=data)

    def restore(self, restore_id: str) -> RestoreOut:
        return self._model(RestoreOut, "GET", f"/restores/{_q(restore_id)}")

    def restores(
        self, state: str | list[str] | None = None, limit: int = 100, offset: int = 0
    ) -> RestorePage:
        """Restores newest first (``state="migrating"``: the instant restores being copied)."""
        params: dict[str, str | int | Sequence[str]] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        return self._model(RestorePage, "GET", "/restores", params=params)

    def wait_restore(
        self,
        restore_id: str,
        until: frozenset[str] | set[str] = RESTORE_ENDED_STATES,
        timeout: float = 3600.0,
        poll: float = 0.5,
    ) -> RestoreOut:
        """Poll the restore until its state is one of *until* (default: ended –
        completed, aborted or failed; ``{"migrating"} | RESTORE_ENDED_STATES`` waits for
        an instant restore's VM); TimeoutError after *timeout* seconds."""
        return _poll(lambda: self.restore(restore_id), until, timeout, poll, f"restore {restore_id}")

    def complete_restore(self, restore_id: str) -> TaskAccepted:
        return self._model(TaskAccepted, "POST", f"/restores/{_q(restore_id)}/complete")

    def abort_restore(self, restore_id: str) -> TaskAccepted:
        return self._model(TaskAccepted, "POST", f"/restores/{_q(restore_id)}/abort")

    def restore_progress(self, restore_id: str, done: int) -> TaskOut:
        return self._task("POST", f"/restores/{_q(restore_id)}/progress", json={"done": done})

    def close(self) -> None:
        self._http.close()


def _q(ref: str) -> str:
    """*ref* as one path segment."""
    return quote(ref, safe="")


class _Stated(Protocol):
    @property
    def state(self) -> str: ...


S = TypeVar("S", bound=_Stated)


def _poll(
    fetch: Callable[[], S], until: frozenset[str] | set[str], timeout: float, poll: float, what: str
) -> S:
    """*fetch* until its answer's state is one of *until*; TimeoutError after *timeout*
    seconds. Soon at first (10 ms), then less and less often, up to every *poll* seconds:
    short waits answer fast, long ones cost few requests."""
    deadline = time.monotonic() + timeout
    interval = min(0.01, poll)
    while True:
        answer = fetch()
        if answer.state in until:
            return answer
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} still {answer.state} after {timeout:.0f} s")
        time.sleep(interval)
        interval = min(poll, interval * 1.5)
