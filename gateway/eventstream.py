"""Response stage: sse-starlette's EventSourceResponse, run with less machinery per stream.

Profiles (loadtest/results/profile.md) showed sse-starlette's per-stream costs: an anyio cancel scope around
every write, a task group of four tasks per response, and, under load, the event-loop turns that every hand-off
between those tasks adds to the time to first token. Here the stream is sent from the request's own task, the
client is watched by the request's one ClientWatch (gateway/disconnect.py), one watchdog timer bounds the writes
(gateway/cutoff.py), and only the ping runs beside it. sse-starlette's shutdown listener is not started: the
gateway's drainer ends streams on shutdown with an error event (gateway/drain.py). The event framing, pings
and send lock are sse-starlette's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from gateway.cutoff import WaitWatchdog
from gateway.disconnect import ClientWatch
from gateway.errors import ClientDisconnected


class RelayEventStream(EventSourceResponse):
    """`content` streams to the client; `after` runs once the response is complete, whatever ended it."""

    def __init__(self, content: AsyncGenerator[bytes, None], *, watch: ClientWatch,
                 after: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._content = content
        self._watch = watch
        self._after = after
        self._send_watchdog = WaitWatchdog(self.send_timeout) if self.send_timeout else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ping = asyncio.get_running_loop().create_task(self._ping(send)) if self.ping_interval > 0 else None
        if self._send_watchdog is not None:
            self._send_watchdog.start()
        try:
            with self._watch.guard():
                await self._stream_response(send)
        except ClientDisconnected:
            pass  # the relay saw the cancellation and closed the worker request
        finally:
            self.active = False
            if ping is not None:
                ping.cancel()
            if self._send_watchdog is not None:
                self._send_watchdog.stop()
            await self._watch.stop()
            with contextlib.suppress(Exception):
                await self._content.aclose()
            await self._after()

    async def _stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self._content:  # the relay's bytes, framed already
            await self._send_with_timeout(send, {"type": "http.response.body", "body": chunk, "more_body": True})
        async with self._send_lock:
            self.active = False
            # Stopped first: uvicorn answers receive() with a disconnect once the response is complete.
            await self._watch.stop()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self._send_watchdog is None:
            await send(message)
            return
        try:
            await self._send_watchdog.wait(send(message))
        except TimeoutError:
            raise SendTimeoutError() from None
