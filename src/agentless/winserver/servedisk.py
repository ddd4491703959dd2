"""``winserver serve-disk``: serve one raw file or VHD chain over NBD until stopped.

Safe by default: read-only unless ``--writable`` (``--read-write``) is given, TCP on
loopback unless ``--bind`` says otherwise, and a TCP export is never reachable by a name
anyone could guess. There are no client certificates: as for the host's grants, the export
name is the credential. So on TCP the name is

- read from ``--name-file FILE`` (0600, first line) or ``WINSERVER_EXPORT_NAME``, at least
  :data:`MIN_NAME_LENGTH` characters, and never printed; or else
- generated (``secrets.token_urlsafe``, 256 bits) and printed once, in the line that says
  where the disk is served.

``--name`` on the command line (visible to every local user in ``ps``) is for unix sockets
only, whose file permissions guard them; their name defaults to the empty name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import secrets
import stat

from agentless import vhd
from agentless.nbd import exports as nbd_exports
from agentless.nbd.errors import NbdError
from agentless.nbd.limits import Limits
from agentless.nbd.server import NbdServer
from agentless.nbd.tls import server_context

__all__ = ["ERRORS", "MIN_NAME_LENGTH", "NAME_VARIABLE", "add_commands", "open_export"]

ERRORS: tuple[type[Exception], ...] = (vhd.VhdError, NbdError)  # reported in one line by the command

# the environment variable that may hold the export name
NAME_VARIABLE = "WINSERVER_EXPORT_NAME"
# shortest export name accepted for TCP: as long as secrets.token_urlsafe(16), 128 bits
MIN_NAME_LENGTH = 22


def open_export(path: str, fmt: str, read_only: bool) -> nbd_exports.Export:
    """A VHD chain export if *path* is a VHD (by its footer, or ``fmt == "vhd"``), else a
    raw file export."""
    if fmt == "auto":
        try:
            with vhd.VhdImage.open(path):
                fmt = "vhd"
        except vhd.CorruptVhdError:
            fmt = "raw"
    if fmt == "vhd":
        return nbd_exports.VhdExport(path, read_only=read_only)
    return nbd_exports.RawFileExport(path, read_only=read_only)


def _given_name(args: argparse.Namespace) -> tuple[str, str] | None:
    """(name, where it came from) from ``--name-file`` or the environment, or None."""
    if args.name_file:
        try:
            with open(args.name_file, encoding="utf-8") as f:
                mode = os.fstat(f.fileno()).st_mode
                first = f.readline(4097)
        except (OSError, UnicodeDecodeError) as error:
            args.parser.error(f"--name-file: cannot read {args.name_file}: {error}")
        if stat.S_IMODE(mode) & 0o077:
            args.parser.error(f"--name-file: {args.name_file} is readable by others (chmod 600 it)")
        return first.strip(), "--name-file"
    if os.environ.get(NAME_VARIABLE):
        return os.environ[NAME_VARIABLE].strip(), NAME_VARIABLE
    return None


def _export_name(args: argparse.Namespace) -> tuple[str, str | None]:
    """The export name and, when it was given rather than chosen here, where it came from
    (then it is not printed)."""
    given = _given_name(args)
    if args.socket is not None:
        if args.name is not None:
            return args.name, None
        return given if given else ("", None)
    if args.name is not None:
        args.parser.error(
            "--name on the command line is visible to every local user: for TCP give the "
            f"export name in --name-file or {NAME_VARIABLE}, or let serve-disk generate one"
        )
    if given is None:
        return secrets.token_urlsafe(32), None
    name, source = given
    if len(name) < MIN_NAME_LENGTH:
        args.parser.error(
            f"the export name from {source} is too short to be unguessable "
            f"(at least {MIN_NAME_LENGTH} characters, e.g. from secrets.token_urlsafe(16))"
        )
    return name, source


async def _serve(
    args: argparse.Namespace, export: nbd_exports.Export, name: str, source: str | None, limits: Limits
) -> None:
    tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    server = NbdServer({name: export}, tls=tls, limits=limits)
    if args.socket:
        await server.serve_unix(args.socket)
        where = f"nbd+unix:///{name}?socket={args.socket}"
    else:
        port = await server.serve_tcp(args.bind, args.port, plain=args.no_tls)
        scheme = "nbds" if tls else "nbd"
        host = f"[{args.bind}]" if ":" in args.bind else args.bind
        where = f"{scheme}://{host}:{port}/{name}"
        if source is not None:  # the operator's secret: not echoed
            where = f"{scheme}://{host}:{port}, export name from {source}"
    mode = "read-only" if export.read_only else "writable"
    line = f"serving {args.file} ({export.size} bytes, {mode}) at {where}"
    await server.serve_until_signalled(lambda: print(line, flush=True))
    if args.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)


def _cmd_serve_disk(args: argparse.Namespace) -> int:
    if args.socket is None and args.port is None:
        args.parser.error("give --socket PATH or --port N")
    if args.socket is not None and args.port is not None:
        args.parser.error("--socket and --port exclude each other")
    if args.port is not None:
        if bool(args.tls_cert) != bool(args.tls_key):
            args.parser.error("--tls-cert and --tls-key go together")
        if not args.tls_cert and not args.no_tls:
            args.parser.error("TCP needs TLS: give --tls-cert and --tls-key (or --no-tls on loopback)")
        try:
            loopback = ipaddress.ip_address(args.bind).is_loopback
        except ValueError:
            args.parser.error(f"--bind: {args.bind!r} is not an IP address")
        if args.no_tls and not loopback:
            args.parser.error("--no-tls is only allowed with a loopback --bind address")
    try:
        limits = Limits(args.max_connections, args.max_connections_per_peer, args.handshake_timeout)
    except ValueError as error:
        args.parser.error(str(error))
    name, source = _export_name(args)
    export = open_export(args.file, args.format, not args.writable)
    try:
        asyncio.run(_serve(args, export, name, source, limits))
    finally:
        export.close()
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "serve a raw file or VHD chain over NBD until stopped"
    parser = subparsers.add_parser("serve-disk", help=help_text, description=help_text)
    parser.add_argument("file")
    parser.add_argument("--socket", help="unix socket to listen on")
    parser.add_argument("--port", type=int, help="TCP port to listen on (0 picks one)")
    parser.add_argument("--bind", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    parser.add_argument("--tls-cert", help="server certificate (PEM) for TCP")
    parser.add_argument("--tls-key", help="server private key (PEM) for TCP")
    parser.add_argument("--no-tls", action="store_true", help="plain TCP, loopback only (tests)")
    access = parser.add_mutually_exclusive_group()
    access.add_argument(
        "--writable", "--read-write", action="store_true", help="let clients write (default: read-only)"
    )
    access.add_argument("--read-only", action="store_true", help="the default; kept for old command lines")
    parser.add_argument("--name", help="export name, unix sockets only (default empty)")
    parser.add_argument(
        "--name-file",
        metavar="FILE",
        help=f"read the export name from FILE (mode 0600), also ${NAME_VARIABLE}; for TCP "
        "the default is a generated name, printed once",
    )
    parser.add_argument("--format", choices=["auto", "raw", "vhd"], default="auto")
    defaults = Limits()
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help=f"TCP connections in total (default {defaults.max_connections})",
    )
    parser.add_argument(
        "--max-connections-per-peer",
        type=int,
        default=defaults.max_connections_per_peer,
        help=f"TCP connections per client address (default {defaults.max_connections_per_peer})",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=defaults.handshake_timeout,
        metavar="SECONDS",
        help=f"time a client has to negotiate (default {defaults.handshake_timeout:g})",
    )
    parser.set_defaults(handler=_cmd_serve_disk, parser=parser)
