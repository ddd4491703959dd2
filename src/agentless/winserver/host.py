"""A WinServer host's state directory, made by ``winserver init --dir D``::

    D/
      host.json           identity: magic, version, host uuid, name, addresses, ports,
                          and the longest VHD chain a disk may have (max_chain_depth)
      pki/ca-cert.pem     the host's own CA (pinned by WinCenter and wddk clients)
      pki/ca-key.pem      (0600)
      pki/server-cert.pem the certificate of the host API and the NBD server, for the
      pki/server-key.pem  host's names and addresses (key 0600)
      token.sha256        SHA-256 of the host token; the token itself is shown once
      metadata.db         SQLite: storage repositories, VDIs, VMs, NICs
      sr/default/         the default storage repository: one VHD file per VDI

The directory is built under a temporary name and renamed into place, so an interrupted
``init`` leaves nothing half-made; an existing host is never overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from typing import Any

from agentless.lifetime import Closing
from agentless.statedir import building, read_identity, write_pki, write_private

from .errors import HostError
from .metadata import Metadata, StorageRepository, new_uuid

__all__ = ["HOST_MAGIC", "Host", "HostError", "check_max_chain_depth"]

HOST_MAGIC = "agentless-winserver-host"
HOST_VERSION = 1
DEFAULT_API_PORT = 8443
DEFAULT_NBD_PORT = 10809
DEFAULT_MAX_CHAIN_DEPTH = 3


@dataclasses.dataclass(frozen=True)
class HostIdentity:
    uuid: str
    name: str
    addresses: tuple[str, ...]
    api_port: int
    nbd_port: int
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH

    def to_json(self) -> dict[str, Any]:
        return {
            "magic": HOST_MAGIC,
            "version": HOST_VERSION,
            "uuid": self.uuid,
            "name": self.name,
            "addresses": list(self.addresses),
            "api_port": self.api_port,
            "nbd_port": self.nbd_port,
            "max_chain_depth": self.max_chain_depth,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str) -> HostIdentity:
        if data.get("magic") != HOST_MAGIC:
            raise HostError(f"{path}: not a WinServer host file")
        if data.get("version") != HOST_VERSION:
            raise HostError(f"{path}: host format version {data.get('version')}, expected {HOST_VERSION}")
        try:
            return cls(
                uuid=str(data["uuid"]),
                name=str(data["name"]),
                addresses=tuple(str(a) for a in data["addresses"]),
                api_port=int(data["api_port"]),
                nbd_port=int(data["nbd_port"]),
                max_chain_depth=int(data.get("max_chain_depth", DEFAULT_MAX_CHAIN_DEPTH)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise HostError(f"{path}: malformed host file ({error})") from None


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_max_chain_depth(depth: int) -> int:
    """*depth* if it is a usable chain limit: a disk and one snapshot need two files."""
    if not 2 <= depth <= 64:
        raise HostError(f"max chain depth {depth}: give 2 to 64 (a disk and a snapshot are 2 files)")
    return depth


class Host(Closing):
    """An initialised host directory, open: identity, PKI paths, metadata database.

    ``api_port``, ``nbd_port`` and ``max_chain_depth`` start as recorded in ``host.json``;
    the daemon overrides them with its command-line options for the time it runs.
    ``nbd_advertised_port`` is the NBD port written in access info when it is not the one
    the daemon listens on (a port forward, NAT, or a test's proxy in between); None: the
    same."""

    def __init__(self, directory: str, identity: HostIdentity, metadata: Metadata):
        self.directory = directory
        self.identity = identity
        self.metadata = metadata
        self.api_port = identity.api_port
        self.nbd_port = identity.nbd_port
        self.nbd_advertised_port: int | None = None
        self.max_chain_depth = identity.max_chain_depth

    # ------------------------------------------------------------------ making and opening

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        *,
        name: str | None = None,
        addresses: Sequence[str] = ("127.0.0.1", "localhost"),
        api_port: int = DEFAULT_API_PORT,
        nbd_port: int = DEFAULT_NBD_PORT,
        max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
    ) -> tuple[Host, str]:
        """Make a new host in *directory* (which must not exist, or be empty); returns the
        open host and its token – the only time the token is available."""
        identity = HostIdentity(
            uuid=new_uuid(),
            name=name or os.uname().nodename,
            addresses=tuple(addresses),
            api_port=api_port,
            nbd_port=nbd_port,
            max_chain_depth=check_max_chain_depth(max_chain_depth),
        )
        token = "wst_" + secrets.token_urlsafe(32)  # never starts with "-" (an option)
        with building(directory, HostError, "winserver") as staging:
            write_pki(staging, f"WinServer host CA {identity.name}", identity.name, identity.addresses)
            write_private(os.path.join(staging, "token.sha256"), _token_digest(token) + "\n")
            write_private(os.path.join(staging, "host.json"), json.dumps(identity.to_json(), indent=2) + "\n")
            for private in ("sr", os.path.join("sr", "default")):  # 0700 whatever the umask
                os.mkdir(os.path.join(staging, private), 0o700)
                os.chmod(os.path.join(staging, private), 0o700)
            with (
                Metadata(os.path.join(staging, "metadata.db"), create=True) as metadata,
                metadata.session() as s,
            ):
                s.add(StorageRepository(name="default", path="sr/default", is_default=True))
        return cls.open(directory), token

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Host:
        """Open an initialised host directory; HostError if it is not one."""
        target = os.path.abspath(os.fspath(directory))
        data = read_identity(target, "host.json", HostError, "WinServer host", "winserver init")
        identity = HostIdentity.from_json(data, os.path.join(target, "host.json"))
        return cls(target, identity, Metadata(os.path.join(target, "metadata.db")))

    # ------------------------------------------------------------------ credentials

    def pki_path(self, name: str) -> str:
        """Path of ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``..."""
        return os.path.join(self.directory, "pki", name)

    @property
    def server_cert_pem(self) -> str:
        with open(self.pki_path("server-cert.pem")) as f:
            return f.read()

    def check_token(self, token: str) -> bool:
        """True if *token* is this host's token (constant-time comparison)."""
        with open(os.path.join(self.directory, "token.sha256")) as f:
            expected = f.read().strip()
        return hmac.compare_digest(_token_digest(token), expected)

    def guest_socket(self, vm_uuid: str, position: int) -> str:
        """The unix socket on which a running VM's disk *position* is served to its guest."""
        return os.path.join(self.directory, "run", f"{vm_uuid[:8]}-{position}.sock")

    def sr_path(self, sr: StorageRepository) -> str:
        """Absolute directory of a storage repository (stored relative to the host)."""
        return os.path.join(self.directory, sr.path)

    def close(self) -> None:
        self.metadata.close()
