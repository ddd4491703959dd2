"""``winserver vhd ...``: create, inspect, map, check, repair, coalesce, import, export and
write VHDs.

Every command that reports takes ``--json`` and then prints one JSON document on stdout.
Failures print one line on stderr and exit with 1 (see :mod:`agentless.winserver.cli`);
``check`` and ``repair`` print one line per problem found.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import sys
import tempfile
from typing import IO, Any

from agentless import vhd
from agentless.commands import emit
from agentless.units import format_size, size_argument
from agentless.vhd.convert import ConvertStats
from agentless.vhd.footer import VHD_EPOCH

__all__ = ["ERRORS", "add_commands"]

ERRORS: tuple[type[Exception], ...] = (vhd.VhdError,)  # reported in one line by the command


def _image_info(image: vhd.VhdImage) -> dict[str, Any]:
    footer = image.footer
    info: dict[str, Any] = {
        "path": image.path,
        "type": footer.type_name,
        "size": footer.size,
        "unique_id": str(footer.unique_id),
        "timestamp": datetime.datetime.fromtimestamp(footer.timestamp + VHD_EPOCH, datetime.UTC).isoformat(),
        "creator": footer.creator_application.decode("latin-1").rstrip("\0 "),
        "geometry": {
            "cylinders": footer.geometry[0],
            "heads": footer.geometry[1],
            "sectors": footer.geometry[2],
        },
        "file_size": os.fstat(image.fd).st_size,
    }
    header = image.header
    if header is not None:
        info["block_size"] = header.block_size
        info["max_table_entries"] = header.max_table_entries
        info["allocated_blocks"] = int(image.allocated_blocks().size)
    if image.is_differencing and header is not None:
        info["parent"] = {
            "name": header.parent_name,
            "unique_id": str(header.parent_unique_id) if header.parent_unique_id else None,
            "locators": [
                {"platform": loc.platform.decode("latin-1"), "path": text} for loc, text in image.locators()
            ],
        }
    return info


def _cmd_create(args: argparse.Namespace) -> int:
    if args.parent is not None:
        if args.size is not None or args.type is not None:
            args.parser.error("--parent takes neither --size nor --type")
        vhd.create_differencing(args.file, args.parent)
    else:
        if args.size is None:
            args.parser.error("give --size (or --parent for a differencing disk)")
        if (args.type or "dynamic") == "fixed":
            vhd.create_fixed(args.file, args.size)
        else:
            vhd.create_dynamic(args.file, args.size, args.block_size)
    with vhd.VhdImage.open(args.file) as image:
        info = _image_info(image)
    emit(args, info, f"created {info['type']} disk {args.file} of {format_size(info['size'])}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    with vhd.Chain.open(args.file) as chain:
        info = _image_info(chain.leaf)
        info["chain"] = chain.paths
    lines = [f"{k}: {v}" for k, v in info.items() if k not in ("parent", "chain", "geometry")]
    if "parent" in info:
        lines.append(f"parent: {info['parent']['name']} ({info['parent']['unique_id']})")
    lines.append("chain: " + " -> ".join(info["chain"]))
    emit(args, info, "\n".join(lines))
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    with vhd.Chain.open(args.file) as chain:
        extents = chain.extents()
        size = chain.size
    allocated = sum(e.length for e in extents)
    document = {
        "size": size,
        "allocated": allocated,
        "extents": [{"offset": e.offset, "length": e.length} for e in extents],
    }
    text = "\n".join(f"{e.offset:>16} {e.length:>16}" for e in extents)
    header = f"{'offset':>16} {'length':>16}"
    summary = f"{len(extents)} extents, {format_size(allocated)} of {format_size(size)} allocated"
    emit(args, document, "\n".join(filter(None, [header, text, summary])))
    return 0


def _problem_document(problem: vhd.Problem) -> dict[str, Any]:
    return {
        "path": problem.path,
        "field": problem.field,
        "offset": problem.offset,
        "reason": problem.reason,
        "used": problem.used or None,
        "repair": problem.fix or None,
    }


def _problem_line(command: str, problem: vhd.Problem) -> str:
    """One line per problem: what is wrong, which copy was read instead, and whether
    ``winserver vhd repair`` mends it."""
    if problem.fix:
        verdict = f"`winserver vhd repair {problem.path}` would {problem.fix}"
    else:
        verdict = "`winserver vhd repair` cannot mend this"
    return f"winserver vhd {command}: {problem}; {verdict}"


def _cmd_check(args: argparse.Namespace) -> int:
    problems = vhd.check(args.file)
    document = {
        "path": args.file,
        "ok": not problems,
        "repairable": bool(problems) and all(p.fix for p in problems),
        "problems": [_problem_document(p) for p in problems],
    }
    if args.json:
        emit(args, document, "")
    elif problems:
        for problem in problems:
            print(_problem_line("check", problem), file=sys.stderr)
    else:
        print(f"{args.file}: ok")
    return 1 if problems else 0


def _cmd_repair(args: argparse.Namespace) -> int:
    report = vhd.repair(args.file)
    document = {
        "path": args.file,
        "ok": not report.remaining,
        "repaired": [{"field": p.field, "offset": p.offset, "action": p.fix} for p in report.repaired],
        "problems": [_problem_document(p) for p in report.remaining],
    }
    if args.json:
        emit(args, document, "")
    else:
        for problem in report.repaired:
            print(f"{args.file}: {problem.field}: {problem.fix}")
        for problem in report.remaining:
            print(_problem_line("repair", problem), file=sys.stderr)
        if not report.repaired and not report.remaining:
            print(f"{args.file}: ok, nothing to repair")
    return 1 if report.remaining else 0


def _cmd_coalesce(args: argparse.Namespace) -> int:
    result = vhd.coalesce(args.child, remove_child=not args.keep_child)
    document = {
        "child": result.child,
        "parent": result.parent,
        "bytes_copied": result.bytes_copied,
        "child_removed": result.child_removed,
    }
    gone = "; child removed" if result.child_removed else ""
    emit(args, document, f"coalesced {format_size(result.bytes_copied)} into {result.parent}{gone}")
    return 0


def _emit_conversion(args: argparse.Namespace, key: str, stats: ConvertStats, text: str) -> None:
    """Report an import (``key`` "vhd") or an export (``key`` "raw")."""
    document = {
        key: getattr(args, key),
        "size": stats.size,
        "bytes_written": stats.bytes_written,
        "bytes_skipped": stats.bytes_skipped,
    }
    emit(args, document, text)


def _cmd_import(args: argparse.Namespace) -> int:
    stats = vhd.import_raw(args.raw, args.vhd, args.type, args.block_size)
    _emit_conversion(
        args, "vhd", stats, f"imported {format_size(stats.bytes_written)} of data into {args.vhd}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    stats = vhd.export_raw(args.vhd, args.raw)
    _emit_conversion(args, "raw", stats, f"exported {format_size(stats.bytes_written)} of data to {args.raw}")
    return 0


def _cmd_write(args: argparse.Namespace) -> int:
    """Write the input at the offset. The input's length is known before the first byte
    is written (standard input is spooled to a temporary file first), so input that does
    not fit is refused with the disk untouched."""
    with contextlib.ExitStack() as stack:
        if args.input == "-":
            source: IO[bytes] = stack.enter_context(tempfile.TemporaryFile())
            shutil.copyfileobj(sys.stdin.buffer, source, 8 << 20)
            source.seek(0)
        else:
            source = stack.enter_context(open(args.input, "rb"))
        length = os.fstat(source.fileno()).st_size
        chain = stack.enter_context(vhd.Chain.open(args.vhd, writable=True))
        if args.offset + length > chain.size:
            raise vhd.OutOfRangeError(
                f"{args.vhd}: {length} bytes at offset {args.offset} do not fit "
                f"in the disk of {chain.size} bytes; nothing written"
            )
        written = 0
        while data := source.read(8 << 20):
            chain.write(args.offset + written, data)
            written += len(data)
        chain.flush()
    document = {"vhd": args.vhd, "offset": args.offset, "bytes_written": written}
    emit(args, document, f"wrote {written} bytes at offset {args.offset} of {args.vhd}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``vhd`` and its sub-commands."""
    group = subparsers.add_parser("vhd", help="create, inspect and convert VHD disk images")
    commands = group.add_subparsers(dest="vhd_command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=help)
        parser.add_argument("--json", action="store_true", help="print a JSON document")
        return parser

    p = command("create", "create a fixed, dynamic or differencing disk")
    p.add_argument("file")
    p.add_argument("--size", type=size_argument, help="virtual size, e.g. 10G")
    p.add_argument("--type", choices=["fixed", "dynamic"], help="default dynamic")
    p.add_argument("--block-size", type=size_argument, default=vhd.DEFAULT_BLOCK_SIZE, help="default 2M")
    p.add_argument("--parent", help="make a differencing disk over PARENT")
    p.set_defaults(handler=_cmd_create, parser=p)

    p = command("info", "show a disk's footer, header and chain")
    p.add_argument("file")
    p.set_defaults(handler=_cmd_info)

    p = command("map", "list the allocated extents of the whole chain")
    p.add_argument("file")
    p.set_defaults(handler=_cmd_map)

    p = command("check", "check the structure of a disk and its parents (exit 1 if unsound)")
    p.add_argument("file")
    p.set_defaults(handler=_cmd_check)

    p = command(
        "repair",
        "rewrite a damaged footer from its sound copy and clear BAT entries past the disk's "
        "end (exit 1 if problems remain); no other program may have the disk open",
    )
    p.add_argument("file")
    p.set_defaults(handler=_cmd_repair)

    p = command("coalesce", "merge a differencing disk into its parent, then remove it")
    p.add_argument("child")
    p.add_argument("--keep-child", action="store_true", help="keep the merged child file")
    p.set_defaults(handler=_cmd_coalesce)

    p = command("import", "copy a raw image into a new VHD (zero blocks stay unallocated)")
    p.add_argument("raw")
    p.add_argument("vhd")
    p.add_argument("--type", choices=["fixed", "dynamic"], default="dynamic")
    p.add_argument("--block-size", type=size_argument, default=vhd.DEFAULT_BLOCK_SIZE)
    p.set_defaults(handler=_cmd_import)

    p = command("export", "write a disk's whole chain to a sparse raw image")
    p.add_argument("vhd")
    p.add_argument("raw")
    p.set_defaults(handler=_cmd_export)

    p = command("write", "write a file's bytes into a disk at an offset")
    p.add_argument("vhd")
    p.add_argument(
        "--offset", type=size_argument, required=True, help="byte offset (suffixes K, M, G allowed)"
    )
    p.add_argument("--input", required=True, help="file to write, - for standard input")
    p.set_defaults(handler=_cmd_write)
