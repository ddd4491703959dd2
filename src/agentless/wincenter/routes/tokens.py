"""``/whoami`` and ``/tokens``: the caller, and the tokens (admins)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from ..audit import set_result
from ..auth import Admin, CenterDep, Reader
from ..schemas import API_PREFIX, TokenCreate, TokenCreated, TokenList, TokenOut, WhoAmI
from .common import CONFLICT, NOT_FOUND, token_out

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["tokens"])


@router.get("/whoami")
def whoami(caller: Reader) -> WhoAmI:
    """The token this request was made with, and what its role allows."""
    return WhoAmI(
        token_id=caller.id,
        name=caller.name,
        role=caller.role.value,
        permissions=sorted(p.value for p in caller.permissions),
    )


@router.get("/tokens")
def list_tokens(_caller: Admin, c: CenterDep) -> TokenList:
    """Every token, revoked ones included (never the token itself)."""
    return TokenList(tokens=[token_out(t) for t in c.tokens.list()])


@router.post("/tokens", status_code=201)
def create_token(body: TokenCreate, request: Request, _caller: Admin, c: CenterDep) -> TokenCreated:
    """A new token of the given role. The token is in this answer only."""
    info, token = c.tokens.create(body.role, body.name)
    set_result(request, f"token {info.id} ({info.name}, {info.role.value}) created")
    return TokenCreated(**token_out(info).model_dump(), token=token)


@router.delete("/tokens/{token_id}", responses=NOT_FOUND | CONFLICT)
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=2**31 - 1)], request: Request, _caller: Admin, c: CenterDep
) -> TokenOut:
    """Revoke a token: from now on it gets 401. 409 if it is revoked already."""
    info = c.tokens.revoke(token_id)
    set_result(request, f"token {info.id} ({info.name}) revoked")
    return token_out(info)
