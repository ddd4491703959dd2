"""Run a daemon of the project with uvicorn's access log written to a file, to count the
HTTP statuses it answered (the load row counts 5xx this way).

``python -m bench.campaign.accesslog LOG MODULE ARG...`` runs ``python -m MODULE ARG...``
(``agentless.wincenter.cli serve ...``, ``agentless.winserver.cli serve ...``) unchanged
but for one thing: uvicorn's ``uvicorn.access`` logger, which the daemons leave at
``warning`` (no line per request), logs every answer to *LOG* as
``STATUS METHOD PATH``. Every answer uvicorn sends goes through it – the routes', the
problem+json of the request guard, and the 503 of ``limit_concurrency`` – so that the
count does not depend on what the daemon chooses to log. The daemon's own stdout and
stderr are untouched.

:func:`statuses` reads such a file back.
"""

from __future__ import annotations

import collections
import logging
import runpy
import sys
from pathlib import Path

import uvicorn.config

__all__ = ["main", "statuses"]


class _Answers(logging.Handler):
    """Writes ``STATUS METHOD PATH`` per access record (uvicorn's record arguments are
    client, method, path, HTTP version, status)."""

    def __init__(self, path: str):
        super().__init__(logging.INFO)
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the daemon's life

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 5:
            _client, method, path, _version, status = args
            self.file.write(f"{status} {method} {str(path)[:200]}\n")


def main(argv: list[str]) -> None:
    log, module, *rest = argv
    handler = _Answers(log)
    configure = uvicorn.config.Config.configure_logging

    def configure_logging(self: uvicorn.config.Config) -> None:
        configure(self)
        access = logging.getLogger("uvicorn.access")
        access.handlers = [handler]
        access.setLevel(logging.INFO)
        access.propagate = False

    uvicorn.config.Config.configure_logging = configure_logging  # type: ignore[method-assign]
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def statuses(path: Path) -> tuple[collections.Counter[int], list[str]]:
    """The answers of a log written by :func:`main`: a count per status, and the lines of
    the 5xx ones."""
    counts: collections.Counter[int] = collections.Counter()
    errors = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            status = line.partition(" ")[0]
            if status.isdigit():
                counts[int(status)] += 1
                if status.startswith("5"):
                    errors.append(line)
    return counts, errors


if __name__ == "__main__":
    main(sys.argv[1:])
