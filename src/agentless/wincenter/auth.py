"""Who may call what: the one FastAPI dependency every route goes through.

A route declares the permission it needs by taking a :data:`Reader`, :data:`Operator` or
:data:`Admin` argument (each is ``Depends(Require(permission))``); the dependency reads
``Authorization: Bearer <token>``, looks the token up and answers

- **401** (``WWW-Authenticate: Bearer``) with no token, an unknown one or a revoked one;
- **403** when the token's role lacks the permission (the matrix is in :mod:`.tokens`);

and otherwise hands the route the caller's :class:`~.tokens.TokenInfo`, which it also
leaves in the request state for the audit log. ``tests/wincenter/test_auth.py`` checks
that every ``/api`` route of the app depends on :class:`Require`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .audit import set_caller
from .center import Center
from .problems import Problem
from .tokens import Permission, TokenInfo

__all__ = ["Admin", "Operator", "Reader", "Require", "center_of"]

_bearer = HTTPBearer(auto_error=False, description="a WinCenter token (`wincenter token create`)")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def center_of(request: Request) -> Center:
    """The center the app serves (``app.state.center``); 503 when it has none (an app
    built only for its OpenAPI document)."""
    center = getattr(request.app.state, "center", None)
    if not isinstance(center, Center):
        raise Problem(503, "Service Unavailable", "this application serves no center")
    return center


class Require:
    """The dependency that admits callers whose role has *permission*."""

    def __init__(self, permission: Permission):
        self.permission = permission

    def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> TokenInfo:
        if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
            raise Problem(401, "Unauthorized", "a token is required (Authorization: Bearer ...)", _CHALLENGE)
        caller = center_of(request).tokens.authenticate(credentials.credentials)
        if caller is None:
            raise Problem(401, "Unauthorized", "unknown or revoked token", _CHALLENGE)
        set_caller(request, caller)
        if not caller.allows(self.permission):
            raise Problem(
                403, "Forbidden", f"role {caller.role.value} lacks the {self.permission.value} permission"
            )
        return caller


Reader = Annotated[TokenInfo, Depends(Require(Permission.READ))]
Operator = Annotated[TokenInfo, Depends(Require(Permission.OPERATE))]
Admin = Annotated[TokenInfo, Depends(Require(Permission.ADMIN))]
CenterDep = Annotated[Center, Depends(center_of)]
