"""WinCenter as vmbackup reaches it: WinCenter's published client, with connections that
fail retried for a short while.

A WinCenter restarting, or a load balancer moving it, refuses connections for a few
seconds; a backup command that failed at once for that would have to be run again by
hand. So a request whose connection could not be made (refused, unreachable, timed out
while connecting) is tried again with growing pauses – 0.5, 1, 2, 4, 4… seconds – until
:data:`RETRY_SECONDS` (``VMBACKUP_CONNECT_RETRY``; 0: no retry) have passed, then fails
with one line. Such a request never reached WinCenter, so trying it again is safe for
every method, POST included. So is a request WinCenter answered ``503 Service
Unavailable``: it says so when its database is unreachable (PostgreSQL restarting) or it
serves too many connections, and the request was not done (its transaction rolled back).
Nothing else is retried: any other answer is WinCenter's word, a TLS failure (wrong CA,
wrong name) does not heal by waiting, and a connection that broke after the request was
sent may have done it.

Without the 503 retry, a PostgreSQL restart under WinCenter failed every backup that
asked it something meanwhile – and the abort of that backup too, so WinCenter kept it
open and queued the retry behind it until its expiry (``tests/test_fleet_netns.py``).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable

import httpx

from agentless.redaction import redact
from agentless.wincenter.client import CenterApiError, CenterClient, CenterUnreachable, Params
from agentless.wincenter.schemas import VmOut

from .settings import SettingsError

__all__ = ["PAGE", "RETRY_SECONDS", "Center", "every_vm", "retry_seconds"]

RETRY_SECONDS = 15.0
PAGE = 500  # VMs asked for per ``GET /vms`` page (WinCenter answers at most 1 000)
_FIRST_PAUSE = 0.5
_LONGEST_PAUSE = 4.0


def retry_seconds() -> float:
    """How long connections are retried: ``VMBACKUP_CONNECT_RETRY`` (seconds), else
    :data:`RETRY_SECONDS`."""
    given = os.environ.get("VMBACKUP_CONNECT_RETRY")
    if not given:
        return RETRY_SECONDS
    try:
        seconds = float(given)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise SettingsError(f"VMBACKUP_CONNECT_RETRY={given!r}: give seconds, 0 to 3600")
    return seconds


def _not_connected(error: CenterUnreachable) -> bool:
    """Whether *error* is a connection that could not be made (the request was not
    sent) for another reason than TLS."""
    if not isinstance(error.__cause__, httpx.ConnectError | httpx.ConnectTimeout):
        return False
    seen: BaseException | None = error.__cause__
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return False
        seen = seen.__cause__ or seen.__context__
    return True


class Center(CenterClient):
    """:class:`~agentless.wincenter.client.CenterClient` whose requests are tried again
    while the connection is refused, for up to *retry_for* seconds (None:
    :func:`retry_seconds`). *on_retry* hears one line the first time a request waits
    (an operator then knows why the command pauses); *sleep* is the clock's."""

    def __init__(
        self,
        url: str,
        token: str,
        ca_pem: str | bytes,
        timeout: float = 120.0,
        retry_for: float | None = None,
        on_retry: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        super().__init__(url, token, ca_pem, timeout=timeout)
        self.url = url.rstrip("/")
        self.retry_for = retry_seconds() if retry_for is None else retry_for
        self.on_retry = on_retry
        self.sleep = sleep
        self._told = False

    def call(self, method: str, path: str, *, params: Params | None = None, json: object = None) -> object:
        waited, pause, attempts = 0.0, _FIRST_PAUSE, 1
        while True:
            try:
                return super().call(method, path, params=params, json=json)
            except CenterApiError as error:
                if error.status != 503:
                    raise
                if waited >= self.retry_for:
                    if attempts > 1:
                        raise CenterApiError(
                            error.status,
                            error.title,
                            f"{error.detail} (tried {attempts} times over {waited:.0f} s)",
                            error.problem,
                        ) from error
                    raise
                self._tell(f"WinCenter {redact(self.url)} is unavailable ({error.detail})")
            except CenterUnreachable as error:
                if not _not_connected(error):
                    raise
                if waited >= self.retry_for:
                    reason = redact(error.__cause__ or error)
                    tried = f"; tried {attempts} times over {waited:.0f} s" if attempts > 1 else ""
                    raise CenterUnreachable(
                        f"WinCenter {redact(self.url)} unreachable: {reason}{tried}"
                    ) from error
                self._tell(f"WinCenter {redact(self.url)} unreachable ({redact(error.__cause__ or error)})")
            pause = min(pause, self.retry_for - waited)
            self.sleep(pause)
            waited += pause
            pause = min(pause * 2, _LONGEST_PAUSE)
            attempts += 1

    def _tell(self, what: str) -> None:
        """Say once why requests wait (an operator then knows why the command pauses)."""
        if self.on_retry is not None and not self._told:
            self._told = True
            self.on_retry(f"{what}; trying again for up to {self.retry_for:g} s")


def every_vm(center: CenterClient, page: int = PAGE) -> list[VmOut]:
    """Every VM WinCenter lists (``vmbackup backup --all``), page after page of ``GET
    /vms`` (by name, then id) until the pages reach the ``total`` WinCenter states, or a
    page comes back empty – never assuming one page holds them all, nor that WinCenter
    answers as many as asked (a server may cap its pages lower than *page*).

    A VM that appears twice (a VM created while paging moved the others one place on) is
    kept once. A VM created or deleted while the pages are read may be missed or still be
    listed (its backup then fails alone, saying so); the next run sees the inventory as it
    is then."""
    seen: dict[str, VmOut] = {}
    offset = 0
    while True:
        answer = center.vms(limit=page, offset=offset)
        for vm in answer.items:
            seen.setdefault(vm.id, vm)
        offset += len(answer.items)
        if not answer.items or offset >= answer.total:
            return list(seen.values())
