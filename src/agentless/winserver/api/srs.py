"""``/srs``: storage repositories (list without a lock; create under the inventory lock)."""

from __future__ import annotations

from fastapi import APIRouter

from agentless.wire import SrCreateRequest, SrInfo, SrList

from ..storage import create_sr, list_srs
from .context import Api

router = APIRouter(tags=["srs"])


@router.get("/srs", response_model=SrList)
def get_srs(api: Api) -> SrList:
    return SrList(srs=list_srs(api.host))


@router.post("/srs", status_code=201, response_model=SrInfo)
def post_sr(api: Api, body: SrCreateRequest) -> SrInfo:
    with api.locks.inventory:
        return create_sr(api.host, body.name, body.path)
