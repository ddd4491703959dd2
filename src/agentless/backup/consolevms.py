"""The backup console's VMs: the list, a VM's page, back up now, restore and instant
restore. (Being written.)"""

from __future__ import annotations

from agentless.console import Console

from .consolesite import ConsoleSite

__all__ = ["add_pages"]


def add_pages(console: Console, site: ConsoleSite) -> None:
    """Add these pages to *console*."""
