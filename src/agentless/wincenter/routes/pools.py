"""``/pools``: the hosts' storage pools (storage repositories)."""

from __future__ import annotations

from fastapi import APIRouter

from ..auth import Reader
from ..schemas import API_PREFIX, PoolList, PoolOut
from .common import NOT_FOUND, Flows, Limit, Offset, Ref

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["pools"])


@router.get("/pools")
def list_pools(
    _caller: Reader, f: Flows, limit: Limit = 100, offset: Offset = 0, host: Ref | None = None
) -> PoolList:
    """Storage pools by host and name, paged; ``?host=`` filters."""
    pools = f.inventory.pools(host)
    return PoolList(items=pools[offset : offset + limit], total=len(pools), limit=limit, offset=offset)


@router.get("/pools/{ref}", responses=NOT_FOUND)
def get_pool(ref: Ref, _caller: Reader, f: Flows) -> PoolOut:
    return f.inventory.pool(ref)
