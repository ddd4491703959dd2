"""``winserver serve``: run the host daemon (its whole stack – FastAPI, uvicorn, the NBD
server – is loaded only by this command: :mod:`.cli`)."""

from __future__ import annotations

import argparse

from agentless.commands import add_bind_option
from agentless.nbd.errors import NbdError
from agentless.nbd.limits import Limits
from agentless.vhd import VhdError

from .daemon import LOOPBACK, REMOTE_READ_TIMEOUT, serve
from .host import Host, HostError
from .hostcli import host_directory
from .metadata import MetadataError

__all__ = ["ERRORS", "add_commands"]

ERRORS: tuple[type[Exception], ...] = (VhdError, NbdError, HostError, MetadataError)  # one line each


def _cmd_serve(args: argparse.Namespace) -> int:
    with Host.open(host_directory(args)) as host:
        serve(
            host,
            bind=args.bind,
            port=args.nbd_port,
            api_port=args.api_port,
            max_chain_depth=args.max_chain_depth,
            advertised_port=args.nbd_advertised_port,
            nbd_limits=_nbd_limits(args),
            remote_read_timeout=args.remote_read_timeout,
        )
    return 0


def _nbd_limits(args: argparse.Namespace) -> Limits:
    """The NBD server's connection limits from ``serve``'s options (defaults for those not
    given); a bad value is a HostError."""
    given = {
        "max_connections": args.nbd_max_connections,
        "max_connections_per_peer": args.nbd_max_connections_per_peer,
        "handshake_timeout": args.nbd_handshake_timeout,
    }
    try:
        return Limits(**{k: v for k, v in given.items() if v is not None})
    except ValueError as error:
        raise HostError(f"NBD limits: {error}") from error


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "run the host daemon: the HTTPS host API and NBD with TLS for granted disks"
    p = subparsers.add_parser("serve", help=help_text, description=help_text)
    p.add_argument("--dir", help="host state directory (default $WINSERVER_DIR)")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(parser=p)
    add_bind_option(p, LOOPBACK, "the API and NBD listen on")
    p.add_argument("--nbd-port", type=int, help="default: the port given at init")
    p.add_argument(
        "--nbd-advertised-port",
        type=int,
        help="the NBD port written in access info, when clients reach the NBD server through "
        "another port (port forward, NAT, proxy); default: --nbd-port",
    )
    p.add_argument("--api-port", type=int, help="default: the port given at init")
    p.add_argument("--max-chain-depth", type=int, help="default: the limit given at init")
    limits = Limits()
    p.add_argument(
        "--nbd-max-connections",
        type=int,
        help=f"NBD TCP connections in total (default {limits.max_connections})",
    )
    p.add_argument(
        "--nbd-max-connections-per-peer",
        type=int,
        help=f"NBD TCP connections per client address (default {limits.max_connections_per_peer})",
    )
    p.add_argument(
        "--nbd-handshake-timeout",
        type=float,
        metavar="SECONDS",
        help=f"time an NBD client has to negotiate (default {limits.handshake_timeout:g})",
    )
    p.add_argument(
        "--remote-read-timeout",
        type=float,
        default=REMOTE_READ_TIMEOUT,
        metavar="SECONDS",
        help="how long a guest's read of a block not yet copied from its remote base waits for "
        f"an unreachable source before it fails with EIO (default {REMOTE_READ_TIMEOUT:g})",
    )
    p.set_defaults(handler=_cmd_serve)
