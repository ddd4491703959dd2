"""The WinCenter REST API's routes: one :class:`fastapi.APIRouter` per resource, in the
order the OpenAPI document lists them (:data:`ROUTERS`); :func:`..api.make_app` mounts
them. Each route is a plain function that FastAPI runs in a worker thread; the permission
it needs is its ``Reader``/``Operator``/``Admin`` argument (:mod:`..auth`), and it answers
the model its service returns."""

from __future__ import annotations

from fastapi import APIRouter

from . import audit, backups, hosts, pools, restores, tasks, tokens, vms
from .common import task_out, token_out

__all__ = ["ROUTERS", "task_out", "token_out"]

ROUTERS: tuple[APIRouter, ...] = (
    tokens.router,
    audit.router,
    tasks.router,
    hosts.router,
    pools.router,
    vms.router,
    backups.router,
    restores.router,
)
