"""The typed client of the host API – what WinCenter (and the ``winserver`` CLI) use.

HTTPS with the host's certificate pinned: the client trusts exactly the PEM it was given
(from ``winserver init``'s ``pki/server-cert.pem``, or registered in WinCenter), and sends
the host token as a bearer token. Every answer is parsed into its model of
:mod:`agentless.wire` here, at the edge. Errors come back as :class:`HostApiError` with the
problem+json fields; connection failures as :class:`HostUnreachable`. This module imports
nothing of the host's internals: WinCenter depends on it alone.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import TypeVar
from urllib.parse import quote

import httpx
import pydantic

from agentless.lifetime import Closing
from agentless.nbd.tls import client_context
from agentless.wire import (
    BackupType,
    ChangedBlocks,
    GrantInfo,
    GrantList,
    HostInfo,
    PrepareBackupRequest,
    PreparedBackup,
    Problem,
    RemoteAccessStopped,
    SmInfo,
    SnapshotDeleted,
    SnapshotInfo,
    SnapshotList,
    SnapshotTaken,
    SrCreateRequest,
    SrInfo,
    SrList,
    StopRemoteAccessRequest,
    UpdateBackupIdRequest,
    VdiInfo,
    VdiList,
    VmCreateRequest,
    VmDeleted,
    VmDiskCreate,
    VmInfo,
    VmList,
    WriteAccess,
)

__all__ = ["API_PREFIX", "HostApiError", "HostClient", "HostProtocolError", "HostUnreachable"]

API_PREFIX = "/api/v1"
M = TypeVar("M", bound=pydantic.BaseModel)
Params = Mapping[str, str | bool]


def _q(ref: str) -> str:
    """*ref* (a uuid or a VM name, which may hold any character) as one path segment."""
    return quote(ref, safe="")


class HostApiError(Exception):
    """The host refused a request: ``status`` (HTTP), ``title``, ``detail``."""

    def __init__(self, status: int, title: str, detail: str):
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail


class HostUnreachable(Exception):
    """No answer from the host (down, wrong address, certificate mismatch)."""


class HostProtocolError(HostApiError):
    """The host answered, but not with what the host API promises (a field missing or of
    the wrong type): a host of another version, or not a host. Status 502."""

    def __init__(self, detail: str):
        super().__init__(502, "Bad Gateway", f"the host's answer does not fit the host API: {detail}")


class HostClient(Closing):
    """One host: ``HostClient("https://10.0.0.5:8443", token, cert_pem)``."""

    def __init__(self, base_url: str, token: str, cert_pem: str | bytes, timeout: float = 120.0):
        context: ssl.SSLContext = client_context(cert_pem)
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + API_PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            verify=context,
            timeout=timeout,
        )

    def _call(
        self, method: str, path: str, params: Params | None = None, json: pydantic.BaseModel | None = None
    ) -> object:
        body = json.model_dump(mode="json") if json is not None else None
        try:
            response = self._http.request(method, path, params=params, json=body)
        except httpx.TransportError as error:
            raise HostUnreachable(f"{self._http.base_url}: {error}") from error
        if response.status_code >= 400:
            try:
                problem = Problem.model_validate(response.json())
                title, detail = problem.title, problem.detail
            except (ValueError, pydantic.ValidationError):
                title, detail = response.reason_phrase, response.text
            raise HostApiError(response.status_code, title, detail)
        answer: object = response.json()
        return answer

    def _model(
        self,
        model: type[M],
        method: str,
        path: str,
        params: Params | None = None,
        json: pydantic.BaseModel | None = None,
    ) -> M:
        """The answer of one call, parsed into *model* (the edge: an answer that does not
        fit is a :class:`HostProtocolError`, never a half-read dict downstream)."""
        body = self._call(method, path, params, json)
        try:
            return model.model_validate(body)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the body"
            raise HostProtocolError(f"{method} {path}: {where}: {first['msg']}") from None

    def host(self) -> HostInfo:
        return self._model(HostInfo, "GET", "/host")

    def list_srs(self) -> list[SrInfo]:
        return self._model(SrList, "GET", "/srs").srs

    def create_sr(self, name: str, path: str) -> SrInfo:
        body = SrCreateRequest(name=name, path=path)
        return self._model(SrInfo, "POST", "/srs", json=body)

    def list_vdis(self, sr: str | None = None) -> list[VdiInfo]:
        return self._model(VdiList, "GET", "/vdis", params={"sr": sr} if sr else {}).vdis

    def vdi(self, uuid: str) -> VdiInfo:
        return self._model(VdiInfo, "GET", f"/vdis/{_q(uuid)}")

    def list_changed_blocks(self, vdi_from: str, vdi_to: str) -> ChangedBlocks:
        """XenServer's VDI.list_changed_blocks: base64 bitmap and byte extents."""
        return self._model(
            ChangedBlocks, "GET", f"/vdis/{_q(vdi_to)}/changed-blocks", params={"from": vdi_from}
        )

    def list_snapshots(self, vm: str | None = None) -> list[SnapshotInfo]:
        return self._model(SnapshotList, "GET", "/snapshots", params={"vm": vm} if vm else {}).snapshots

    def list_grants(self, backup_id: str | None = None) -> list[GrantInfo]:
        params = {"backup_id": backup_id} if backup_id else {}
        return self._model(GrantList, "GET", "/grants", params=params).grants

    def list_vms(self) -> list[VmInfo]:
        return self._model(VmList, "GET", "/vms").vms

    def create_vm(
        self,
        name: str,
        disks: Sequence[int | VmDiskCreate],
        nics: list[str] | None = None,
        vcpus: int = 1,
        memory: int = 1 << 30,
        cbt: bool = True,
        sr: str | None = None,
        uuid: str | None = None,
        migration_rate_limit: int | None = None,
    ) -> VmInfo:
        """A new halted VM; a disk is a size, or a :class:`VmDiskCreate` with a remote
        base (``source``) copied at *migration_rate_limit* bytes per second at most."""
        body = VmCreateRequest(
            name=name,
            disks=disks,
            nics=nics or [],
            vcpus=vcpus,
            memory=memory,
            cbt=cbt,
            sr=sr,
            uuid=uuid,
            migration_rate_limit=migration_rate_limit,
        )
        return self._model(VmInfo, "POST", "/vms", json=body)

    def vm(self, ref: str) -> VmInfo:
        return self._model(VmInfo, "GET", f"/vms/{_q(ref)}")

    def start_vm(self, ref: str, driver: str | None = None) -> VmInfo:
        params = {"driver": driver} if driver else {}
        return self._model(VmInfo, "POST", f"/vms/{_q(ref)}/start", params=params)

    def stop_vm(self, ref: str) -> VmInfo:
        return self._model(VmInfo, "POST", f"/vms/{_q(ref)}/stop")

    def delete_vm(self, ref: str) -> VmInfo:
        """Delete a halted VM and its disks; the VM as it was."""
        return self._model(VmDeleted, "DELETE", f"/vms/{_q(ref)}").deleted

    def snapshot_vm(self, ref: str, name: str | None = None) -> SnapshotTaken:
        params = {"name": name} if name else {}
        return self._model(SnapshotTaken, "POST", f"/vms/{_q(ref)}/snapshots", params=params)

    def delete_snapshot(self, uuid: str, keep_cbt: bool = False) -> SnapshotDeleted:
        return self._model(SnapshotDeleted, "DELETE", f"/snapshots/{_q(uuid)}", params={"keep_cbt": keep_cbt})

    def get_vdi_sm_info(self, vdi: str) -> SmInfo:
        return self._model(SmInfo, "GET", f"/vdis/{_q(vdi)}/sm-info")

    def prepare_backup(
        self, vm: str, backup_id: str, backup_type: BackupType, base_backup_id: str | None = None
    ) -> PreparedBackup:
        body = PrepareBackupRequest(
            vm=vm, backup_id=backup_id, type=backup_type, base_backup_id=base_backup_id
        )
        return self._model(PreparedBackup, "POST", "/prepare-backup", json=body)

    def update_backup_id(self, vdi: str, backup_id: str) -> WriteAccess:
        body = UpdateBackupIdRequest(vdi=vdi, backup_id=backup_id)
        return self._model(WriteAccess, "POST", "/update-backup-id", json=body)

    def stop_remote_access(self, backup_id: str, delete_snapshot: bool = False) -> RemoteAccessStopped:
        body = StopRemoteAccessRequest(backup_id=backup_id, delete_snapshot=delete_snapshot)
        return self._model(RemoteAccessStopped, "POST", "/stop-remote-access", json=body)

    def close(self) -> None:
        self._http.close()
