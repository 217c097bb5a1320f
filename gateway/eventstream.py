"""Response stage: sse-starlette's EventSourceResponse with a cheaper per-send timeout.

sse-starlette bounds every send with anyio's `move_on_after`, a cancel scope per SSE write: with hundreds of
streams that bookkeeping is a measurable share of the gateway's CPU (loadtest/results/profile.md). Here one
watchdog timer per response gives the same bound, a reader that takes no bytes for `send_timeout` is cut,
without a timer per write (gateway/cutoff.py). Pings, disconnect detection and shutdown handling stay
sse-starlette's.
"""

from __future__ import annotations

from typing import Any

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from gateway.cutoff import WaitWatchdog


class RelayEventStream(EventSourceResponse):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._send_watchdog = WaitWatchdog(self.send_timeout) if self.send_timeout else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._send_watchdog is None:
            await super().__call__(scope, receive, send)
            return
        self._send_watchdog.start()
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._send_watchdog.stop()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self._send_watchdog is None:
            await send(message)
            return
        try:
            await self._send_watchdog.wait(send(message))
        except TimeoutError:
            raise SendTimeoutError() from None
