"""Live progress pushed to a page: server-sent events of JSON snapshots.

A page element ``<div data-live="URL">`` opens an ``EventSource`` on URL
(``console.js``). :func:`event_stream` answers it: every *interval* it asks *poll* for a
snapshot – a mapping of page element ids to what they show (``text``, and for a
``<progress>`` ``value`` and ``max``; ``state`` becomes the element's ``data-state``,
``href`` its link, ``hidden`` whether it shows, ``time`` a ``<time>``'s moment) and
whether the work has ended – and sends it when it changed. When the work ends it sends
the last snapshot and an ``end`` event, and ``console.js`` closes the stream (and reloads
the page when the element says ``data-live-end="reload"``, to show what the work made).

A comment line every :data:`KEEPALIVE` seconds keeps proxies from closing a quiet
stream; a stream lasts at most :data:`LONGEST` seconds (the browser reconnects by
itself), so a forgotten tab holds no connection forever.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

__all__ = ["KEEPALIVE", "LONGEST", "Snapshot", "event_stream"]

KEEPALIVE = 15.0
LONGEST = 3600.0

Snapshot = tuple[Mapping[str, Mapping[str, Any]], bool]
"""(element id -> what it shows, whether the work has ended)"""


def event_stream(request: Request, poll: Callable[[], Snapshot], interval: float = 0.5) -> StreamingResponse:
    """The ``text/event-stream`` answer that sends *poll*'s snapshots (run in a worker
    thread: it may read a database) until the work ends or the browser goes away."""

    async def events() -> AsyncIterator[str]:
        started = last_sent = time.monotonic()
        previous = ""
        while time.monotonic() - started < LONGEST:
            fields, ended = await asyncio.to_thread(poll)
            text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
            if text != previous:
                yield f"data: {text}\n\n"
                previous, last_sent = text, time.monotonic()
            elif time.monotonic() - last_sent > KEEPALIVE:
                yield ": keepalive\n\n"
                last_sent = time.monotonic()
            if ended:
                yield "event: end\ndata: {}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(interval)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )
