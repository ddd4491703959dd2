"""Print the OpenAPI document of the WinCenter REST API.

``python -m agentless.wincenter.openapi > docs/api/openapi.json`` (or ``make openapi``)
regenerates the checked-in copy; a test fails while the copy is not current. The
document is the one the server serves at ``/openapi.json``, built from an app without a
center, so no directory or database is needed.
"""

from __future__ import annotations

import sys
from typing import Any

from agentless import openapidoc

from .api import make_app

__all__ = ["document", "main", "render"]


def document() -> dict[str, Any]:
    """The OpenAPI document, as served."""
    return make_app(None).openapi()


def render() -> str:
    """The document as the checked-in file holds it."""
    return openapidoc.render(document())


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
