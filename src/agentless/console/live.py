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
itself), so a forgotten tab holds no connection forever. Each stream holds a connection
of the daemon's server for as long as it lasts, so a console holds at most
:data:`MAX_STREAMS` at once (:class:`LiveStreams`, which :meth:`.Console.install` puts in
the app's state): past that a page's stream ends at once and the page shows what it had
when it loaded – WinCenter's API, served by the same server, keeps its connections.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

__all__ = ["KEEPALIVE", "LONGEST", "MAX_STREAMS", "LiveStreams", "Snapshot", "event_stream"]

KEEPALIVE = 15.0
LONGEST = 3600.0
MAX_STREAMS = 32


class LiveStreams:
    """How many live streams a console has open; at most *limit*."""

    def __init__(self, limit: int = MAX_STREAMS):
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """One more stream, if there is room."""
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.open -= 1


Snapshot = tuple[Mapping[str, Mapping[str, Any]], bool]
"""(element id -> what it shows, whether the work has ended)"""


def event_stream(request: Request, poll: Callable[[], Snapshot], interval: float = 0.5) -> StreamingResponse:
    """The ``text/event-stream`` answer that sends *poll*'s snapshots (run in a worker
    thread: it may read a database) until the work ends or the browser goes away. When
    the console has :data:`MAX_STREAMS` open already, it ends at once (an ``end`` event):
    the page keeps what it showed when it loaded."""
    streams = getattr(request.app.state, "live_streams", None)

    async def events() -> AsyncIterator[str]:
        if isinstance(streams, LiveStreams) and not streams.take():
            yield "event: end\ndata: {}\n\n"
            return
        try:
            async for event in _events(request, poll, interval):
                yield event
        finally:
            if isinstance(streams, LiveStreams):
                streams.give()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


async def _events(request: Request, poll: Callable[[], Snapshot], interval: float) -> AsyncIterator[str]:
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
