"""``winserver serve``: the host daemon – the HTTPS host API and the NBD service.

The API (:mod:`.api`, uvicorn over TLS with the host's certificate) listens on the host's
API port; NBD serves every live grant over TCP with TLS on the host's NBD port.
Grants are looked up in the metadata database at each handshake; once a second the daemon
revokes expired grants and drops the connections of every revoked one – also those
revoked by another process (``winserver stop-remote-access``). On start it revokes the
grants left from before (an NBD session does not survive a restart), finishes interrupted
snapshot deletions, removes VHD files no VDI refers to, and restarts running VMs.

Both listen on loopback unless ``--bind`` names another address: a host that others
(WinCenter, backup systems) reach must be given one, and the daemon warns when the grants
it hands out name an address it does not listen on. The API reads a request body only
from a caller with a valid token and up to 1 MiB (:mod:`agentless.httpguard`), and
serves at most :data:`CONCURRENCY` connections at once.

Port 0 (``--api-port 0``, ``--nbd-port 0``, or recorded so by ``winserver init``) picks a
free port at each start. Once both listen, the daemon prints one line naming the ports it
bound – ``winserver NAME: API https://BIND:PORT/api/v1, NBD with TLS on BIND:PORT`` – and
writes the API's URL to ``run/api.json`` (:mod:`.presence`); access info and ``GET
/host`` name the bound ports too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal

import uvicorn

from agentless.httpguard import UVICORN_LIMITS
from agentless.nbd.limits import Limits
from agentless.nbd.server import NbdServer
from agentless.nbd.tls import server_context

from .api import API_PREFIX, make_app
from .errors import PowerState
from .grants import GrantExports, Grants
from .host import Host, HostError, check_max_chain_depth
from .migration import Migrations
from .presence import DaemonPresence
from .runtime import Runtime
from .snapshots import finish_deletions, sweep_orphans
from .storage import make_private
from .vms import list_vms

__all__ = ["CONCURRENCY", "LOOPBACK", "serve"]

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
CONCURRENCY = 128  # connections (or requests) at once on the API; past it, 503
LOOPBACK = "127.0.0.1"
REMOTE_READ_TIMEOUT = 20.0  # seconds a guest read of a block not yet copied waits for its source


async def _watch(exports: GrantExports, server: NbdServer, stop: asyncio.Event) -> None:
    dropped: set[str] = set()
    while not stop.is_set():
        exports.revoke_expired()
        revoked = await asyncio.to_thread(exports.grants.revoked_names)
        fresh = revoked - dropped
        if fresh:
            server.disconnect(fresh.__contains__)
            exports.forget(fresh)
            dropped |= fresh
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_SECONDS)


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _bound_port(api: uvicorn.Server, configured: int) -> int:
    """The port the started API listens on: *configured*, or the one port 0 picked."""
    for server in api.servers:
        for sock in server.sockets:
            return int(sock.getsockname()[1])
    return configured


def _local_url(bind: str, port: int) -> str:
    address = "127.0.0.1" if bind in ("", "0.0.0.0", "::") else bind
    return f"https://[{address}]:{port}" if ":" in address else f"https://{address}:{port}"


async def _run(
    host: Host,
    bind: str,
    presence: DaemonPresence,
    nbd_limits: Limits | None = None,
    remote_read_timeout: float = REMOTE_READ_TIMEOUT,
) -> None:
    grants = Grants(host.metadata)
    finish_deletions(host)
    orphans = sweep_orphans(host)
    stale = grants.revoke_all()
    if orphans or stale:
        log.warning("recovery: removed %d orphan file(s), revoked %d grant(s)", len(orphans), len(stale))
    opened = make_private(host)
    if opened:
        log.warning("storage: %d SR entries other users could read are now the host's only", opened)
    exports = GrantExports(grants)
    tls = server_context(host.pki_path("server-cert.pem"), host.pki_path("server-key.pem"))
    server = NbdServer(exports, tls=tls, limits=nbd_limits)
    exports.disconnect = server.disconnect
    host.nbd_port = await server.serve_tcp(bind, host.nbd_port)  # port 0: the one it picked
    runtime = Runtime(host, migrations=Migrations(host, remote_read_timeout))
    runtime.migrations.resume_all()  # before the VMs: their linked disks are the migrations'
    for vm in list_vms(host):  # recovery: the datapaths of running VMs come back
        if vm.power_state == PowerState.RUNNING:
            await runtime.start(vm.uuid)
    config = uvicorn.Config(
        make_app(host, grants, runtime, asyncio.get_running_loop(), presence.local_token, exports),
        host=bind,
        port=host.api_port,
        ssl_certfile=host.pki_path("server-cert.pem"),
        ssl_keyfile=host.pki_path("server-key.pem"),
        log_level="warning",
        lifespan="off",
        limit_concurrency=CONCURRENCY,
        **UVICORN_LIMITS,
    )
    api = uvicorn.Server(config)
    api_task = asyncio.create_task(api.serve())
    while not api.started:
        if api_task.done():
            api_task.result()  # raises why it could not start (port in use...)
            raise RuntimeError("the host API stopped at start")
        await asyncio.sleep(0.05)
    host.api_port = _bound_port(api, config.port)
    presence.publish(_local_url(bind, host.api_port))
    granted = host.identity.addresses[0]
    if _loopback(bind) and not _loopback(granted):
        log.warning(
            "listening on %s only, but grants name %s: give --bind to serve other machines", bind, granted
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # before the line: a signal on it stops cleanly
        loop.add_signal_handler(signum, stop.set)
    print(
        f"winserver {host.identity.name}: API https://{bind}:{host.api_port}{API_PREFIX}, "
        f"NBD with TLS on {bind}:{host.nbd_port}",
        flush=True,
    )
    try:
        await _watch(exports, server, stop)
    finally:
        api.should_exit = True
        await api_task
        await runtime.shutdown()
        await server.close()
        exports.close()


def serve(
    host: Host,
    bind: str = LOOPBACK,
    port: int | None = None,
    api_port: int | None = None,
    max_chain_depth: int | None = None,
    advertised_port: int | None = None,
    nbd_limits: Limits | None = None,
    remote_read_timeout: float = REMOTE_READ_TIMEOUT,
) -> None:
    """Run until SIGINT or SIGTERM; the ports and the chain limit default to the host's.
    *advertised_port*: the NBD port that access info names, when clients reach the NBD
    server through another port (default: the one it listens on). The API and NBD listen
    on *bind*, loopback unless the caller says otherwise."""
    if port is not None:
        host.nbd_port = port
    if advertised_port is not None:
        if not 0 < advertised_port < 65536:
            raise HostError(f"advertised NBD port {advertised_port}: give 1 to 65535")
        host.nbd_advertised_port = advertised_port
    if api_port is not None:
        host.api_port = api_port
    if max_chain_depth is not None:
        host.max_chain_depth = check_max_chain_depth(max_chain_depth)
    with contextlib.closing(DaemonPresence(host)) as presence:
        presence.claim()
        asyncio.run(_run(host, bind, presence, nbd_limits, remote_read_timeout))
