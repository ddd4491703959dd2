"""``/audit``: the audit log (admins)."""

from __future__ import annotations

from fastapi import APIRouter

from ..auth import Admin, CenterDep
from ..schemas import API_PREFIX, AuditEntryOut, AuditPage
from .common import Limit, Offset

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["audit"])


@router.get("/audit")
def audit(_caller: Admin, c: CenterDep, limit: Limit = 100, offset: Offset = 0) -> AuditPage:
    """Mutating calls (who, what, when, result), newest first."""
    records, total = c.audit.page(limit, offset)
    items = [AuditEntryOut.model_validate(r, from_attributes=True) for r in records]
    return AuditPage(items=items, total=total, limit=limit, offset=offset)
