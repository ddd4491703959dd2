"""The backup console's restore points, their files, and the repositories' upkeep
(verify, prune, gc). (Being written.)"""

from __future__ import annotations

from typing import Any

from agentless.console import Console

from .consolesite import ConsoleSite

__all__ = ["add_pages", "repository_usage"]


def add_pages(console: Console, site: ConsoleSite) -> None:
    """Add the restore points' and repositories' pages to *console*."""


def repository_usage(site: ConsoleSite, location: str) -> dict[str, Any]:
    """The usage figures of the repository at *location* (the dashboard's)."""
    return {}
