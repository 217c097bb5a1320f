"""A minimal SSE response for measuring what sse_starlette costs per event (gateway_variants' `leansse` fix).

It sends each yielded chunk as one body message and cancels the stream when the client disconnects; unlike
EventSourceResponse it has no keep-alive pings and no send timeout, so it is a measurement aid only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
           (b"x-accel-buffering", b"no")]


class LeanEventStream(Response):
    """Takes EventSourceResponse's arguments (and ignores the ones it has no use for)."""

    def __init__(self, content: AsyncIterator[bytes], **_: Any) -> None:
        self.body_iterator = content
        self.status_code = 200
        self.background = None
        self.raw_headers = list(HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
