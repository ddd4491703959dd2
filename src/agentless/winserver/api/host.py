"""``GET /host``: the host's identity, ports, certificate, chain limit and GC state."""

from __future__ import annotations

from fastapi import APIRouter

from agentless import __version__
from agentless.wire import HostInfo

from .context import Api

router = APIRouter(tags=["host"])


@router.get("/host", response_model=HostInfo)
def get_host(api: Api) -> HostInfo:
    host = api.host
    identity = host.identity
    return HostInfo(
        uuid=identity.uuid,
        name=identity.name,
        addresses=list(identity.addresses),
        api_port=host.api_port,
        nbd_port=host.nbd_port,
        max_chain_depth=host.max_chain_depth,
        garbage_pending=api.runtime.garbage_pending,
        cert=host.server_cert_pem,
        version=__version__,
    )
