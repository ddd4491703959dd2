"""The checked-in OpenAPI documents of the two REST APIs: one way to write them.

Each API has a module (``agentless.wincenter.openapi``, ``agentless.winserver.openapi``)
whose ``document()`` builds the document its server serves; :func:`render` is how the
checked-in copy under ``docs/api/`` holds it, so that a test can compare the two byte for
byte and ``make openapi`` can write it again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["render"]


def render(document: Mapping[str, object]) -> str:
    """*document* as the checked-in file holds it: indented, keys in order, a newline."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
