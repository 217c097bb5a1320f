"""A minimal SSE response for measuring what sse_starlette costs per event (gateway_variants' `leansse` fix).

It sends each yielded chunk as one body message and cancels the stream when the client disconnects; unlike
EventSourceResponse it has no keep-alive pings and no send timeout, so it is a measurement aid only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.disconnect import ClientWatch
from gateway.errors import ClientDisconnected

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
           (b"x-accel-buffering", b"no")]


class LeanEventStream(Response):
    """Takes RelayEventStream's arguments (and ignores the ones it has no use for)."""

    def __init__(self, content: AsyncIterator[bytes], *, watch: ClientWatch, after: Callable[[], Awaitable[None]],
                 **_: Any) -> None:
        self.body_iterator = content
        self.status_code = 200
        self.background = None
        self.raw_headers = list(HEADERS)
        self._watch = watch
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with self._watch.guard():
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await self._watch.stop()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientDisconnected:
            pass
        finally:
            await self._watch.stop()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await self._after()
