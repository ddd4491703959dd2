"""``winserver init``, ``vm ...``, ``sr ...`` and the four sub-commands (``serve``: :mod:`.servecli`).

Every command takes ``--dir D`` (or the ``WINSERVER_DIR`` environment variable). When a
daemon serves the directory, the commands talk to it through its API (with the local
token it publishes in ``D/run``, or ``--token`` / ``WINSERVER_TOKEN``); when none does,
they work on the directory themselves, and a daemon cannot start until they are done
(:mod:`.presence`). ``vm start`` and ``vm stop`` need the daemon: it runs the VMs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

from pydantic import BaseModel

from agentless.commands import emit
from agentless.nbd.errors import NbdError
from agentless.units import format_size, size_argument
from agentless.vhd import VhdError
from agentless.wire import SrList, VmDeleted, VmInfo, VmList

from .client import HostApiError, HostClient, HostUnreachable
from .errors import HostError, WinServerError
from .host import DEFAULT_API_PORT, DEFAULT_MAX_CHAIN_DEPTH, DEFAULT_NBD_PORT, Host
from .metadata import MetadataError
from .presence import daemon_or_directory
from .remoteaccess import prepare_backup, stop_remote_access, update_backup_id
from .sminfo import sm_info
from .snapshots import delete_snapshot, snapshot_vm
from .storage import create_sr, list_srs
from .vms import create_vm, delete_vm, describe_vm, list_vms

__all__ = ["ERRORS", "add_commands", "host_directory"]

# reported in one line by the commands
ERRORS: tuple[type[Exception], ...] = (
    VhdError,
    NbdError,
    WinServerError,
    MetadataError,
    HostApiError,
    HostUnreachable,
)

T = TypeVar("T")


def _json(answer: BaseModel) -> dict[str, object]:
    """An answer as ``--json`` prints it: the host API's document, wire names."""
    return answer.model_dump(mode="json", by_alias=True)


def host_directory(args: argparse.Namespace) -> str:
    """The host state directory a command names (``--dir``, else ``$WINSERVER_DIR``)."""
    directory = args.dir or os.environ.get("WINSERVER_DIR")
    if not directory:
        args.parser.error("give --dir D (or set WINSERVER_DIR)")
    return str(directory)


def _cmd_init(args: argparse.Namespace) -> int:
    host, token = Host.init(
        host_directory(args),
        name=args.name,
        addresses=args.address or ["127.0.0.1", "localhost"],
        api_port=args.api_port,
        nbd_port=args.nbd_port,
        max_chain_depth=args.max_chain_depth,
    )
    with host:
        document: dict[str, object] = {
            "dir": host.directory,
            "uuid": host.identity.uuid,
            "name": host.identity.name,
            "token": token,
            "ca_cert": host.pki_path("ca-cert.pem"),
            "server_cert": host.pki_path("server-cert.pem"),
        }
    text = (
        f"host {document['name']} ({document['uuid']}) initialised in {document['dir']}\n"
        f"host token (shown once, keep it): {token}"
    )
    emit(args, document, text)
    return 0


def _vm_line(vm: VmInfo) -> str:
    disks = ", ".join(format_size(d.size) for d in vm.disks)
    memory = format_size(vm.memory)
    return f"{vm.name:<20} {vm.uuid}  {vm.power_state:<8} {vm.vcpus} vCPU  {memory}  disks: {disks}"


def _cmd_sr_create(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)  # the daemon's working directory is not ours
    sr = _either(
        args, lambda api: api.create_sr(args.name, path), lambda host: create_sr(host, args.name, path)
    )
    emit(args, _json(sr), f"SR {sr.name} ({sr.uuid}) at {sr.path}")
    return 0


def _cmd_sr_list(args: argparse.Namespace) -> int:
    srs = _either(args, lambda api: api.list_srs(), list_srs)
    lines = [f"{sr.name:<16} {sr.uuid}  {sr.vdis:>4} VDIs  {sr.path}" for sr in srs]
    emit(args, _json(SrList(srs=srs)), "\n".join(lines))
    return 0


def _cmd_vm_create(args: argparse.Namespace) -> int:
    vm = _either(
        args,
        lambda api: api.create_vm(
            args.name, args.disk, args.nic or [], args.vcpus, args.memory, not args.no_cbt, args.sr
        ),
        lambda host: create_vm(
            host, args.name, args.disk, args.nic or [], args.vcpus, args.memory, not args.no_cbt, args.sr
        ),
    )
    emit(args, _json(vm), f"created VM {vm.name} ({vm.uuid})")
    return 0


def _cmd_vm_list(args: argparse.Namespace) -> int:
    vms = _either(args, lambda api: api.list_vms(), list_vms)
    emit(args, _json(VmList(vms=vms)), "\n".join(_vm_line(vm) for vm in vms) or "no VMs")
    return 0


def _cmd_vm_show(args: argparse.Namespace) -> int:
    vm = _either(args, lambda api: api.vm(args.name), lambda host: describe_vm(host, args.name))
    lines = [_vm_line(vm)]
    lines += [f"  disk {d.position}: {d.vdi} {format_size(d.size)} {d.path}" for d in vm.disks]
    lines += [f"  nic {n.position}: {n.mac} on {n.network}" for n in vm.nics]
    emit(args, _json(vm), "\n".join(lines))
    return 0


def _cmd_vm_delete(args: argparse.Namespace) -> int:
    vm = _either(args, lambda api: api.delete_vm(args.name), lambda host: delete_vm(host, args.name))
    emit(args, _json(VmDeleted(deleted=vm)), f"deleted VM {vm.name} and its {len(vm.disks)} disk(s)")
    return 0


def _token(args: argparse.Namespace) -> str | None:
    token = getattr(args, "token", None) or os.environ.get("WINSERVER_TOKEN")
    return str(token) if token else None


@contextlib.contextmanager
def _access(args: argparse.Namespace) -> Iterator[tuple[Host, HostClient | None]]:
    """The host, and a client of its daemon's API when a daemon serves it (else None:
    the directory is this command's until the block ends)."""
    with Host.open(host_directory(args)) as host, daemon_or_directory(host) as daemon:
        if daemon is None:
            yield host, None
            return
        with HostClient(daemon.url, _token(args) or daemon.token, host.server_cert_pem) as api:
            yield host, api


def _either(args: argparse.Namespace, remote: Callable[[HostClient], T], local: Callable[[Host], T]) -> T:
    """*remote* through the running daemon's API, or *local* on the directory if none runs
    (both answer the same wire models)."""
    with _access(args) as (host, api):
        return local(host) if api is None else remote(api)


def _needs_daemon(host: Host) -> NoReturn:
    raise HostError(
        f"no daemon serves {host.directory}: start it with `winserver serve --dir {host.directory}`"
    )


def _cmd_vm_snapshot(args: argparse.Namespace) -> int:
    snapshot = _either(
        args,
        lambda api: api.snapshot_vm(args.name, args.snapshot_name),
        lambda host: snapshot_vm(host, args.name, args.snapshot_name),
    )
    emit(args, _json(snapshot), f"snapshot {snapshot.uuid} of {len(snapshot.disks)} disk(s)")
    return 0


def _cmd_vm_start(args: argparse.Namespace) -> int:
    vm = _either(args, lambda api: api.start_vm(args.name, args.driver), _needs_daemon)
    sockets = ", ".join(str(d.guest_socket) for d in vm.disks)
    emit(args, _json(vm), f"VM {vm.name} running (driver {vm.driver}); guest disks at {sockets}")
    return 0


def _cmd_vm_stop(args: argparse.Namespace) -> int:
    vm = _either(args, lambda api: api.stop_vm(args.name), _needs_daemon)
    emit(args, _json(vm), f"VM {vm.name} halted")
    return 0


def _cmd_vm_snapshot_delete(args: argparse.Namespace) -> int:
    result = _either(
        args,
        lambda api: api.delete_snapshot(args.snapshot, keep_cbt=args.keep_cbt),
        lambda host: delete_snapshot(host, args.snapshot, keep_cbt=args.keep_cbt),
    )
    what = "reduced to CBT metadata" if args.keep_cbt else "deleted"
    emit(args, _json(result), f"snapshot {args.snapshot} {what}")
    return 0


def _cmd_prepare_backup(args: argparse.Namespace) -> int:
    result = _either(
        args,
        lambda api: api.prepare_backup(args.vm, args.backup_id, args.type, args.base_backup_id),
        lambda host: prepare_backup(host, args.vm, args.backup_id, args.type, args.base_backup_id),
    )
    lines = [f"backup {result.backup_id}: snapshot {result.snapshot}"]
    for disk in result.disks:
        amount = format_size(sum(e.length for e in disk.extents))
        why = f" ({disk.reason})" if disk.reason else ""
        where = (
            f"nbds://{disk.access.address}:{disk.access.port}/{disk.access.export_name}"
            if disk.access
            else "-"
        )
        lines.append(f"  disk {disk.position}: {disk.type}{why}, {amount} to read at {where}")
    emit(args, _json(result), "\n".join(lines))
    return 0


def _cmd_update_backup_id(args: argparse.Namespace) -> int:
    result = _either(
        args,
        lambda api: api.update_backup_id(args.vdi, args.backup_id),
        lambda host: update_backup_id(host, args.vdi, args.backup_id),
    )
    access = result.access
    emit(
        args,
        _json(result),
        f"write access to {args.vdi}: nbds://{access.address}:{access.port}/{access.export_name}",
    )
    return 0


def _cmd_stop_remote_access(args: argparse.Namespace) -> int:
    result = _either(
        args,
        lambda api: api.stop_remote_access(args.backup_id, args.delete_snapshot),
        lambda host: stop_remote_access(host, args.backup_id, args.delete_snapshot),
    )
    emit(args, _json(result), f"{result.revoked} grant(s) of {args.backup_id} revoked")
    return 0


def _cmd_get_vdi_sm_info(args: argparse.Namespace) -> int:
    info = _either(args, lambda api: api.get_vdi_sm_info(args.vdi), lambda host: sm_info(host, args.vdi))
    lines = [f"VDI {args.vdi}: {format_size(info.size)}, chain depth {info.depth}"]
    for entry in info.chain:
        blocks = "-" if entry.allocated_blocks is None else entry.allocated_blocks
        lines.append(f"  {entry.type:<12} {entry.path}  {blocks} blocks allocated")
    lines.append(f"  {format_size(info.allocated)} allocated in {len(info.extents)} extents")
    emit(args, _json(info), "\n".join(lines))
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--dir", help="host state directory (default $WINSERVER_DIR)")
        parser.add_argument("--json", action="store_true", help="print a JSON document")
        if name != "init":
            parser.add_argument(
                "--token",
                help="host token, if the daemon is asked (default $WINSERVER_TOKEN, else the local one)",
            )
        parser.set_defaults(parser=parser)
        return parser

    p = command(subparsers, "init", "make a new host state directory (CA, certificate, token, database, SR)")
    p.add_argument("--name", help="host name (default: this machine's)")
    p.add_argument("--address", action="append", help="a name or IP the certificate covers (repeat)")
    p.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    p.add_argument("--nbd-port", type=int, default=DEFAULT_NBD_PORT)
    p.add_argument(
        "--max-chain-depth",
        type=int,
        default=DEFAULT_MAX_CHAIN_DEPTH,
        help="longest VHD chain a disk may have; snapshots past it are refused (default %(default)s)",
    )
    p.set_defaults(handler=_cmd_init)

    p = command(subparsers, "prepare-backup", "snapshot a VM and open read access to its disks")
    p.add_argument("--vm", required=True)
    p.add_argument("--backup-id", required=True)
    p.add_argument("--type", choices=["full", "incremental"], required=True)
    p.add_argument("--base-backup-id", help="the previous backup, for an incremental one")
    p.set_defaults(handler=_cmd_prepare_backup)

    p = command(subparsers, "update-backup-id", "open write access to a VDI (a restore target)")
    p.add_argument("--vdi", required=True)
    p.add_argument("--backup-id", required=True)
    p.set_defaults(handler=_cmd_update_backup_id)

    p = command(subparsers, "stop-remote-access", "revoke a backup id's access (and reduce its snapshot)")
    p.add_argument("--backup-id", required=True)
    p.add_argument("--delete-snapshot", action="store_true", help="reduce the snapshot to CBT metadata")
    p.set_defaults(handler=_cmd_stop_remote_access)

    p = command(subparsers, "get_vdi_sm_info", "a VDI's BAT and parent chain, read from the VHD files")
    p.add_argument("--vdi", required=True, help="VDI uuid")
    p.set_defaults(handler=_cmd_get_vdi_sm_info)

    sr_group = subparsers.add_parser("sr", help="storage repositories")
    sr_commands = sr_group.add_subparsers(dest="sr_command", required=True, metavar="COMMAND")
    p = command(sr_commands, "create", "register a directory as a storage repository")
    p.add_argument("name")
    p.add_argument("--path", required=True)
    p.set_defaults(handler=_cmd_sr_create)
    p = command(sr_commands, "list", "list the storage repositories")
    p.set_defaults(handler=_cmd_sr_list)

    group = subparsers.add_parser("vm", help="create, list, show, snapshot and delete VMs")
    vm_commands = group.add_subparsers(dest="vm_command", required=True, metavar="COMMAND")
    p = command(vm_commands, "create", "create a halted VM with blank disks")
    p.add_argument("name")
    p.add_argument(
        "--disk", type=size_argument, action="append", required=True, help="disk size, e.g. 10G (repeat)"
    )
    p.add_argument("--nic", action="append", help="network of a NIC (repeat)")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--memory", type=size_argument, default=1 << 30, help="default 1G")
    p.add_argument("--sr", help="storage repository (name or uuid; default: the default SR)")
    p.add_argument("--no-cbt", action="store_true", help="do not enable changed block tracking")
    p.set_defaults(handler=_cmd_vm_create)
    p = command(vm_commands, "list", "list the VMs")
    p.set_defaults(handler=_cmd_vm_list)
    p = command(vm_commands, "show", "describe one VM (by name or uuid)")
    p.add_argument("name")
    p.set_defaults(handler=_cmd_vm_show)
    p = command(vm_commands, "snapshot", "snapshot every disk of a VM at one instant (online if it runs)")
    p.add_argument("name")
    p.add_argument("--snapshot-name", help="a name for the snapshot")
    p.set_defaults(handler=_cmd_vm_snapshot)
    p = command(vm_commands, "snapshot-delete", "delete a snapshot (coalescing its files away)")
    p.add_argument("snapshot", help="snapshot uuid")
    p.add_argument("--keep-cbt", action="store_true", help="keep it as CBT metadata only (data_destroy)")
    p.set_defaults(handler=_cmd_vm_snapshot_delete)
    p = command(vm_commands, "start", "start a VM in the running daemon")
    p.add_argument("name")
    p.add_argument(
        "--driver",
        choices=["none", "qemu"],
        help="none: disks served on unix sockets only; qemu: qemu-system-x86_64 on them (default: last used)",
    )
    p.set_defaults(handler=_cmd_vm_start)
    p = command(vm_commands, "stop", "stop a VM in the running daemon")
    p.add_argument("name")
    p.set_defaults(handler=_cmd_vm_stop)
    p = command(vm_commands, "delete", "delete a halted VM and its disks")
    p.add_argument("name")
    p.set_defaults(handler=_cmd_vm_delete)
