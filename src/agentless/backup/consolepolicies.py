"""The backup console's policies (list, create, edit, delete, run now) and jobs (runs,
console jobs, live progress). (Being written.)"""

from __future__ import annotations

from agentless.console import Console

from .consolesite import ConsoleSite

__all__ = ["add_pages"]


def add_pages(console: Console, site: ConsoleSite) -> None:
    """Add these pages to *console*."""
