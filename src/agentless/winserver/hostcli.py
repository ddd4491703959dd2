"""``winserver init``, ``vm ...``, ``sr ...``, ``serve`` and the four sub-commands.

Every command takes ``--dir D`` (or the ``WINSERVER_DIR`` environment variable). With a
host token (``--token`` or ``WINSERVER_TOKEN``) the snapshot and remote-access commands go
through the running daemon's API – needed for running VMs, whose disks the daemon serves;
without one they work on the directory (halted VMs). ``vm start``/``vm stop`` always go
through the daemon.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from agentless.commands import emit
from agentless.units import format_size, size_argument

from .client import HostClient
from .daemon import serve
from .host import DEFAULT_API_PORT, DEFAULT_MAX_CHAIN_DEPTH, DEFAULT_NBD_PORT, Host
from .remoteaccess import prepare_backup, stop_remote_access, update_backup_id
from .sminfo import sm_info
from .snapshots import delete_snapshot, snapshot_vm
from .storage import create_sr, list_srs
from .vms import create_vm, delete_vm, describe_vm, list_vms

__all__ = ["add_commands"]


def _directory(args: argparse.Namespace) -> str:
    directory = args.dir or os.environ.get("WINSERVER_DIR")
    if not directory:
        args.parser.error("give --dir D (or set WINSERVER_DIR)")
    return str(directory)


def _cmd_init(args: argparse.Namespace) -> int:
    host, token = Host.init(
        _directory(args),
        name=args.name,
        addresses=args.address or ["127.0.0.1", "localhost"],
        api_port=args.api_port,
        nbd_port=args.nbd_port,
        max_chain_depth=args.max_chain_depth,
    )
    with host:
        document: dict[str, Any] = {
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


def _vm_line(vm: dict[str, Any]) -> str:
    disks = ", ".join(format_size(d["size"]) for d in vm["disks"])
    memory = format_size(vm["memory"])
    state = vm["power_state"]
    return f"{vm['name']:<20} {vm['uuid']}  {state:<8} {vm['vcpus']} vCPU  {memory}  disks: {disks}"


def _cmd_sr_create(args: argparse.Namespace) -> int:
    with Host.open(_directory(args)) as host:
        sr = create_sr(host, args.name, args.path)
    emit(args, sr, f"SR {sr['name']} ({sr['uuid']}) at {sr['path']}")
    return 0


def _cmd_sr_list(args: argparse.Namespace) -> int:
    with Host.open(_directory(args)) as host:
        srs = list_srs(host)
    lines = [f"{sr['name']:<16} {sr['uuid']}  {sr['vdis']:>4} VDIs  {sr['path']}" for sr in srs]
    emit(args, {"srs": srs}, "\n".join(lines))
    return 0


def _cmd_vm_create(args: argparse.Namespace) -> int:
    with Host.open(_directory(args)) as host:
        vm = create_vm(
            host, args.name, args.disk, args.nic or [], args.vcpus, args.memory, not args.no_cbt, args.sr
        )
    emit(args, vm, f"created VM {vm['name']} ({vm['uuid']})")
    return 0


def _cmd_vm_list(args: argparse.Namespace) -> int:
    with Host.open(_directory(args)) as host:
        vms = list_vms(host)
    emit(args, {"vms": vms}, "\n".join(_vm_line(vm) for vm in vms) or "no VMs")
    return 0


def _cmd_vm_show(args: argparse.Namespace) -> int:
    with Host.open(_directory(args)) as host:
        vm = describe_vm(host, args.name)
    lines = [_vm_line(vm)]
    lines += [f"  disk {d['position']}: {d['vdi']} {format_size(d['size'])} {d['path']}" for d in vm["disks"]]
    lines += [f"  nic {n['position']}: {n['mac']} on {n['network']}" for n in vm["nics"]]
    emit(args, vm, "\n".join(lines))
    return 0


def _cmd_vm_delete(args: argparse.Namespace) -> int:
    with Host.open(_directory(args)) as host:
        vm = delete_vm(host, args.name)
    emit(args, {"deleted": vm}, f"deleted VM {vm['name']} and its {len(vm['disks'])} disk(s)")
    return 0


def _token(args: argparse.Namespace) -> str | None:
    token = getattr(args, "token", None) or os.environ.get("WINSERVER_TOKEN")
    return str(token) if token else None


def _daemon_or_here(
    args: argparse.Namespace,
    remote: Callable[[HostClient], dict[str, Any]],
    local: Callable[[Host], dict[str, Any]],
) -> dict[str, Any]:
    """Run *remote* through the daemon's API when a token is given (running VMs need it),
    else *local* on the host directory."""
    with Host.open(_directory(args)) as host:
        if _token(args):
            with _daemon(args, host) as api:
                return remote(api)
        return local(host)


def _cmd_vm_snapshot(args: argparse.Namespace) -> int:
    snapshot = _daemon_or_here(
        args,
        lambda api: api.snapshot_vm(args.name),
        lambda host: snapshot_vm(host, args.name, args.snapshot_name),
    )
    emit(args, snapshot, f"snapshot {snapshot['uuid']} of {len(snapshot['disks'])} disk(s)")
    return 0


def _daemon(args: argparse.Namespace, host: Host) -> HostClient:
    """The running daemon of this host, through its API (the token is needed: only its
    hash is stored)."""
    token = _token(args)
    if not token:
        args.parser.error("this command talks to the daemon: give --token T (or set WINSERVER_TOKEN)")
    url = f"https://127.0.0.1:{host.identity.api_port}"
    return HostClient(url, str(token), host.server_cert_pem)


def _cmd_vm_start(args: argparse.Namespace) -> int:
    with Host.open(_directory(args)) as host, _daemon(args, host) as api:
        vm = api.start_vm(args.name, args.driver)
    sockets = ", ".join(str(d["guest_socket"]) for d in vm["disks"])
    emit(args, vm, f"VM {vm['name']} running (driver {vm['driver']}); guest disks at {sockets}")
    return 0


def _cmd_vm_stop(args: argparse.Namespace) -> int:
    with Host.open(_directory(args)) as host, _daemon(args, host) as api:
        vm = api.stop_vm(args.name)
    emit(args, vm, f"VM {vm['name']} halted")
    return 0


def _cmd_vm_snapshot_delete(args: argparse.Namespace) -> int:
    result = _daemon_or_here(
        args,
        lambda api: api.delete_snapshot(args.snapshot, keep_cbt=args.keep_cbt),
        lambda host: delete_snapshot(host, args.snapshot, keep_cbt=args.keep_cbt),
    )
    what = "reduced to CBT metadata" if args.keep_cbt else "deleted"
    emit(args, result, f"snapshot {args.snapshot} {what}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    with Host.open(_directory(args)) as host:
        serve(
            host,
            bind=args.bind,
            port=args.nbd_port,
            api_port=args.api_port,
            max_chain_depth=args.max_chain_depth,
        )
    return 0


def _cmd_prepare_backup(args: argparse.Namespace) -> int:
    result = _daemon_or_here(
        args,
        lambda api: api.prepare_backup(args.vm, args.backup_id, args.type, args.base_backup_id),
        lambda host: prepare_backup(host, args.vm, args.backup_id, args.type, args.base_backup_id),
    )
    lines = [f"backup {result['backup_id']}: snapshot {result['snapshot']}"]
    for disk in result["disks"]:
        amount = format_size(sum(e["length"] for e in disk["extents"]))
        why = f" ({disk['reason']})" if disk["reason"] else ""
        access = disk["access"]
        lines.append(
            f"  disk {disk['position']}: {disk['type']}{why}, {amount} to read at "
            f"nbds://{access['address']}:{access['port']}/{access['export_name']}"
        )
    emit(args, result, "\n".join(lines))
    return 0


def _cmd_update_backup_id(args: argparse.Namespace) -> int:
    result = _daemon_or_here(
        args,
        lambda api: api.update_backup_id(args.vdi, args.backup_id),
        lambda host: update_backup_id(host, args.vdi, args.backup_id),
    )
    access = result["access"]
    emit(
        args,
        result,
        f"write access to {args.vdi}: nbds://{access['address']}:{access['port']}/{access['export_name']}",
    )
    return 0


def _cmd_stop_remote_access(args: argparse.Namespace) -> int:
    result = _daemon_or_here(
        args,
        lambda api: api.stop_remote_access(args.backup_id, args.delete_snapshot),
        lambda host: stop_remote_access(host, args.backup_id, args.delete_snapshot),
    )
    emit(args, result, f"{result['revoked']} grant(s) of {args.backup_id} revoked")
    return 0


def _cmd_get_vdi_sm_info(args: argparse.Namespace) -> int:
    with Host.open(_directory(args)) as host:
        info = sm_info(host, args.vdi)
    lines = [f"VDI {args.vdi}: {format_size(info['size'])}, chain depth {info['depth']}"]
    for entry in info["chain"]:
        blocks = entry.get("allocated_blocks", "-")
        lines.append(f"  {entry['type']:<12} {entry['path']}  {blocks} blocks allocated")
    lines.append(f"  {format_size(info['allocated'])} allocated in {len(info['extents'])} extents")
    emit(args, info, "\n".join(lines))
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--dir", help="host state directory (default $WINSERVER_DIR)")
        parser.add_argument("--json", action="store_true", help="print a JSON document")
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

    p = command(
        subparsers, "serve", "run the host daemon: the HTTPS host API and NBD with TLS for granted disks"
    )
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--nbd-port", type=int, help="default: the port given at init")
    p.add_argument("--api-port", type=int, help="default: the port given at init")
    p.add_argument("--max-chain-depth", type=int, help="default: the limit given at init")
    p.set_defaults(handler=_cmd_serve)

    p = command(subparsers, "prepare-backup", "snapshot a VM and open read access to its disks")
    p.add_argument("--vm", required=True)
    p.add_argument("--backup-id", required=True)
    p.add_argument("--type", choices=["full", "incremental"], required=True)
    p.add_argument("--base-backup-id", help="the previous backup, for an incremental one")
    p.add_argument("--token", help="host token: go through the running daemon (default $WINSERVER_TOKEN)")
    p.set_defaults(handler=_cmd_prepare_backup)

    p = command(subparsers, "update-backup-id", "open write access to a VDI (a restore target)")
    p.add_argument("--vdi", required=True)
    p.add_argument("--backup-id", required=True)
    p.add_argument("--token", help="host token: go through the running daemon (default $WINSERVER_TOKEN)")
    p.set_defaults(handler=_cmd_update_backup_id)

    p = command(subparsers, "stop-remote-access", "revoke a backup id's access (and reduce its snapshot)")
    p.add_argument("--backup-id", required=True)
    p.add_argument("--delete-snapshot", action="store_true", help="reduce the snapshot to CBT metadata")
    p.add_argument("--token", help="host token: go through the running daemon (default $WINSERVER_TOKEN)")
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
    p = command(vm_commands, "snapshot", "snapshot every disk of a halted VM")
    p.add_argument("name")
    p.add_argument("--snapshot-name", help="a name for the snapshot")
    p.add_argument("--token", help="host token: go through the running daemon (default $WINSERVER_TOKEN)")
    p.set_defaults(handler=_cmd_vm_snapshot)
    p = command(vm_commands, "snapshot-delete", "delete a halted VM's snapshot (coalescing its file away)")
    p.add_argument("snapshot", help="snapshot uuid")
    p.add_argument("--keep-cbt", action="store_true", help="keep it as CBT metadata only (data_destroy)")
    p.add_argument("--token", help="host token: go through the running daemon (default $WINSERVER_TOKEN)")
    p.set_defaults(handler=_cmd_vm_snapshot_delete)
    p = command(vm_commands, "start", "start a VM in the running daemon")
    p.add_argument("name")
    p.add_argument(
        "--driver",
        choices=["none", "qemu"],
        help="none: disks served on unix sockets only; qemu: qemu-system-x86_64 on them (default: last used)",
    )
    p.add_argument("--token", help="host token (default $WINSERVER_TOKEN)")
    p.set_defaults(handler=_cmd_vm_start)
    p = command(vm_commands, "stop", "stop a VM in the running daemon")
    p.add_argument("name")
    p.add_argument("--token", help="host token (default $WINSERVER_TOKEN)")
    p.set_defaults(handler=_cmd_vm_stop)
    p = command(vm_commands, "delete", "delete a halted VM and its disks")
    p.add_argument("name")
    p.set_defaults(handler=_cmd_vm_delete)
