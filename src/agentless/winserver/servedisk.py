"""``winserver serve-disk``: serve one raw file or VHD chain over NBD until stopped."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os

from agentless import vhd
from agentless.nbd import exports as nbd_exports
from agentless.nbd.server import NbdServer
from agentless.nbd.tls import server_context

__all__ = ["add_command", "open_export"]


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


async def _serve(args: argparse.Namespace, export: nbd_exports.Export) -> None:
    tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    server = NbdServer({args.name: export}, tls=tls)
    if args.socket:
        await server.serve_unix(args.socket)
        where = f"nbd+unix:///{args.name}?socket={args.socket}"
    else:
        port = await server.serve_tcp(args.bind, args.port, plain=args.no_tls)
        scheme = "nbds" if tls else "nbd"
        where = f"{scheme}://{args.bind}:{port}/{args.name}"
    mode = "read-only" if export.read_only else "writable"
    print(f"serving {args.file} ({export.size} bytes, {mode}) at {where}", flush=True)
    await server.serve_until_signalled()
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
        if args.no_tls and not ipaddress.ip_address(args.bind).is_loopback:
            args.parser.error("--no-tls is only allowed with a loopback --bind address")
    export = open_export(args.file, args.format, args.read_only)
    try:
        asyncio.run(_serve(args, export))
    finally:
        export.close()
    return 0


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "serve a raw file or VHD chain over NBD until stopped"
    parser = subparsers.add_parser("serve-disk", help=help_text, description=help_text)
    parser.add_argument("file")
    parser.add_argument("--socket", help="unix socket to listen on")
    parser.add_argument("--port", type=int, help="TCP port to listen on (0 picks one)")
    parser.add_argument("--bind", default="0.0.0.0", help="TCP address (default 0.0.0.0)")
    parser.add_argument("--tls-cert", help="server certificate (PEM) for TCP")
    parser.add_argument("--tls-key", help="server private key (PEM) for TCP")
    parser.add_argument("--no-tls", action="store_true", help="plain TCP, loopback only (tests)")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--name", default="", help="export name (default empty)")
    parser.add_argument("--format", choices=["auto", "raw", "vhd"], default="auto")
    parser.set_defaults(handler=_cmd_serve_disk, parser=parser)
