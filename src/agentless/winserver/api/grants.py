"""``GET /grants``: the remote-access grants (no lock: one read of the records)."""

from __future__ import annotations

from fastapi import APIRouter

from agentless.wire import GrantList

from .context import Api

router = APIRouter(tags=["grants"])


@router.get("/grants", response_model=GrantList)
def get_grants(api: Api, backup_id: str | None = None) -> GrantList:
    return GrantList(grants=api.grants.list(backup_id))
