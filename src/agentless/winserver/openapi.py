"""Print the OpenAPI document of the WinServer host API.

``python -m agentless.winserver.openapi > docs/api/host-openapi.json`` (or ``make
openapi``) regenerates the checked-in copy; a test fails while the copy is not current.
The document is the one a daemon serves at ``/api/v1/openapi.json``, built from an app
without a host, so no directory is needed.
"""

from __future__ import annotations

import sys

from agentless import openapidoc

from .api import create_app

__all__ = ["document", "main", "render"]


def document() -> dict[str, object]:
    """The OpenAPI document, as served."""
    return create_app(None, lambda _token: False).openapi()


def render() -> str:
    """The document as the checked-in file holds it."""
    return openapidoc.render(document())


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
