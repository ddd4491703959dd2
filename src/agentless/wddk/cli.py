"""The ``wddk`` command: look at and copy disks over NBD.

    wddk info URI                     size, flags, contexts of an export
    wddk map URI [--context C]        its extents (allocation, or a dirty bitmap)
    wddk copy SRC DST                 either side an NBD URI or a local raw file

``nbds://`` URIs need ``--tls-cert PEM`` (the server certificate to pin). Exit codes: 0
success, 1 failure (one line on stderr), 2 wrong command line, 130 cancelled or
interrupted (not a failure).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from agentless import __version__
from agentless.commands import emit, run_handler
from agentless.nbd.protocol import BASE_ALLOCATION, QEMU_DIRTY_BITMAP
from agentless.nbd.uri import parse_uri
from agentless.units import format_size

from .disk import Disk
from .disk import open as wddk_open
from .errors import FAILURES, Cancelled
from .transfer import Transfer

__all__ = ["main"]

_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")


def _is_uri(text: str) -> bool:
    return text.startswith(_SCHEMES)


def _open(args: argparse.Namespace, uri: str, contexts: tuple[str, ...] = (BASE_ALLOCATION,)) -> Disk:
    parse_uri(uri)  # a clear ValueError for a malformed URI
    cert = pathlib.Path(args.tls_cert).read_text() if args.tls_cert else None
    return wddk_open(uri, connections=args.connections, cert=cert, contexts=contexts)


def _cmd_info(args: argparse.Namespace) -> int:
    with _open(args, args.uri) as disk:
        client = disk.clients[0]
        document = {
            "uri": args.uri,
            "size": disk.size,
            "read_only": disk.read_only,
            "connections": disk.connections,
            "can_multi_conn": client.can_multi_conn,
            "contexts": disk.contexts,
            "block_size": {
                "minimum": client.min_block_size,
                "preferred": client.preferred_block_size,
                "maximum": client.max_block_size,
            },
        }
    text = "\n".join(f"{k}: {v}" for k, v in document.items())
    emit(args, document, text)
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    with _open(args, args.uri, (BASE_ALLOCATION, args.context)) as disk:
        if args.context not in disk.contexts:
            print(f"wddk: the server does not offer context {args.context!r}", file=sys.stderr)
            return 1
        extents = disk.extents(args.context)
    document = {
        "context": args.context,
        "extents": [{"offset": e.offset, "length": e.length, "flags": e.flags} for e in extents],
    }
    text = "\n".join(f"{e.offset:>16} {e.length:>16} {e.flags:>4}" for e in extents)
    emit(args, document, text)
    return 0


def _progress(enabled: bool) -> Any:
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2 and done < total:
            return
        last[0] = now
        percent = 100.0 * done / total if total else 100.0
        print(
            f"\r{format_size(done)} / {format_size(total)} ({percent:.0f}%)",
            end="",
            file=sys.stderr,
            flush=True,
        )

    return show if enabled else None


def _cmd_copy(args: argparse.Namespace) -> int:
    progress = _progress(sys.stderr.isatty() and not args.json)
    try:
        transfer = _copy(args, progress)
    except Cancelled as cancelled:  # a cancel, not a failure
        if progress:
            print(file=sys.stderr)
        print(f"wddk: {cancelled}", file=sys.stderr)
        return 130
    if progress:
        print(file=sys.stderr)
    document = {
        "source": args.src,
        "target": args.dst,
        "bytes": transfer.size,
        "bytes_skipped": transfer.skipped,
        "seconds": round(transfer.seconds, 3),
    }
    emit(args, document, f"copied {format_size(transfer.size)} in {transfer.seconds:.2f}s")
    return 0


def _copy(args: argparse.Namespace, progress: Any) -> Transfer:
    src_uri, dst_uri = _is_uri(args.src), _is_uri(args.dst)
    contexts = (BASE_ALLOCATION, args.context)
    transfer: Transfer
    if src_uri and dst_uri:
        with _open(args, args.src, contexts) as source, _open(args, args.dst) as target:
            transfer = Transfer.between(source, target, context=args.context, progress=progress)
            transfer.run()
    elif src_uri:
        with _open(args, args.src, contexts) as source:
            transfer = source.copy_to(args.dst, context=args.context, progress=progress, durable=args.flush)
    elif dst_uri:
        with _open(args, args.dst) as target:
            transfer = target.copy_from(args.src, progress=progress)
    else:
        args.parser.error("one side of the copy must be an NBD URI")
    return transfer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wddk", description="Read and write disks over NBD.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print a JSON document")
        sub.add_argument("--tls-cert", help="server certificate (PEM file) to pin for nbds:// URIs")
        sub.add_argument("--connections", type=int, default=4, help="NBD connections (default 4)")
        sub.set_defaults(parser=sub)
        return sub

    sub = command("info", "show an export's size, flags and meta contexts")
    sub.add_argument("uri")
    sub.set_defaults(handler=_cmd_info)
    sub = command("map", "list an export's extents for a meta context")
    sub.add_argument("uri")
    sub.add_argument("--context", default=BASE_ALLOCATION, help=f"default {BASE_ALLOCATION}")
    sub.set_defaults(handler=_cmd_map)
    sub = command("copy", "copy between an export and a raw file (or two exports)")
    sub.add_argument("src")
    sub.add_argument("dst")
    sub.add_argument(
        "--context",
        default=BASE_ALLOCATION,
        help=f"copy only this context's extents (e.g. {QEMU_DIRTY_BITMAP}NAME); default {BASE_ALLOCATION}",
    )
    sub.add_argument(
        "--flush", action="store_true", help="make the copy durable (fsync / NBD flush) at the end"
    )
    sub.set_defaults(handler=_cmd_copy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler("wddk", args, (*FAILURES, ValueError, PermissionError))


if __name__ == "__main__":
    sys.exit(main())
