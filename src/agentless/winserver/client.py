"""The typed client of the host API – what WinCenter (and the ``winserver`` CLI) use.

HTTPS with the host's certificate pinned: the client trusts exactly the PEM it was given
(from ``winserver init``'s ``pki/server-cert.pem``, or registered in WinCenter), and sends
the host token as a bearer token. Errors come back as :class:`HostApiError` with the
problem+json fields; connection failures as :class:`HostUnreachable`. This module imports
nothing of the host's internals: WinCenter depends on it alone.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import quote

import httpx

from agentless.lifetime import Closing
from agentless.nbd.tls import client_context

__all__ = ["API_PREFIX", "HostApiError", "HostClient", "HostUnreachable"]

API_PREFIX = "/api/v1"


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

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise HostUnreachable(f"{self._http.base_url}: {error}") from error
        if response.status_code >= 400:
            try:
                body = response.json()
                title, detail = str(body.get("title", "")), str(body.get("detail", body))
            except ValueError:
                title, detail = response.reason_phrase, response.text
            raise HostApiError(response.status_code, title, detail)
        return response.json()

    def host(self) -> dict[str, Any]:
        return dict(self._call("GET", "/host"))

    def list_srs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/srs")["srs"])

    def create_sr(self, name: str, path: str) -> dict[str, Any]:
        return dict(self._call("POST", "/srs", json={"name": name, "path": path}))

    def list_vdis(self, sr: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("GET", "/vdis", params={"sr": sr} if sr else {})["vdis"])

    def vdi(self, uuid: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/vdis/{_q(uuid)}"))

    def list_changed_blocks(self, vdi_from: str, vdi_to: str) -> dict[str, Any]:
        """XenServer's VDI.list_changed_blocks: base64 bitmap and byte extents."""
        return dict(self._call("GET", f"/vdis/{_q(vdi_to)}/changed-blocks", params={"from": vdi_from}))

    def list_snapshots(self, vm: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("GET", "/snapshots", params={"vm": vm} if vm else {})["snapshots"])

    def list_grants(self, backup_id: str | None = None) -> list[dict[str, Any]]:
        params = {"backup_id": backup_id} if backup_id else {}
        return list(self._call("GET", "/grants", params=params)["grants"])

    def list_vms(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/vms")["vms"])

    def create_vm(
        self,
        name: str,
        disks: list[int],
        nics: list[str] | None = None,
        vcpus: int = 1,
        memory: int = 1 << 30,
        cbt: bool = True,
        sr: str | None = None,
        uuid: str | None = None,
    ) -> dict[str, Any]:
        body = {
            "sr": sr,
            "uuid": uuid,
            "name": name,
            "disks": disks,
            "nics": nics or [],
            "vcpus": vcpus,
            "memory": memory,
            "cbt": cbt,
        }
        return dict(self._call("POST", "/vms", json=body))

    def vm(self, ref: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/vms/{_q(ref)}"))

    def start_vm(self, ref: str, driver: str | None = None) -> dict[str, Any]:
        params = {"driver": driver} if driver else {}
        return dict(self._call("POST", f"/vms/{_q(ref)}/start", params=params))

    def stop_vm(self, ref: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/vms/{_q(ref)}/stop"))

    def delete_vm(self, ref: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/vms/{_q(ref)}"))

    def snapshot_vm(self, ref: str, name: str | None = None) -> dict[str, Any]:
        return dict(self._call("POST", f"/vms/{_q(ref)}/snapshots", params={"name": name} if name else {}))

    def delete_snapshot(self, uuid: str, keep_cbt: bool = False) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/snapshots/{_q(uuid)}", params={"keep_cbt": keep_cbt}))

    def get_vdi_sm_info(self, vdi: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/vdis/{_q(vdi)}/sm-info"))

    def prepare_backup(
        self, vm: str, backup_id: str, backup_type: str, base_backup_id: str | None = None
    ) -> dict[str, Any]:
        body = {"vm": vm, "backup_id": backup_id, "type": backup_type, "base_backup_id": base_backup_id}
        return dict(self._call("POST", "/prepare-backup", json=body))

    def update_backup_id(self, vdi: str, backup_id: str) -> dict[str, Any]:
        return dict(self._call("POST", "/update-backup-id", json={"vdi": vdi, "backup_id": backup_id}))

    def stop_remote_access(self, backup_id: str, delete_snapshot: bool = False) -> dict[str, Any]:
        body = {"backup_id": backup_id, "delete_snapshot": delete_snapshot}
        return dict(self._call("POST", "/stop-remote-access", json=body))

    def close(self) -> None:
        self._http.close()
