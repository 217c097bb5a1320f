"""Response stage: sse-starlette's EventSourceResponse with a cheaper per-send timeout.

sse-starlette bounds every send with anyio's `move_on_after`, a cancel scope per SSE write: with hundreds of
streams that bookkeeping is a measurable share of the gateway's CPU (loadtest/results/profile.md). The
stdlib's `asyncio.timeout` gives the same bound, a slow reader cut after `send_timeout`, for a timer
handle per write. Pings, disconnect detection and shutdown handling stay sse-starlette's.
"""

from __future__ import annotations

import asyncio

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Send


class RelayEventStream(EventSourceResponse):
    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        try:
            async with asyncio.timeout(self.send_timeout):
                await send(message)
        except TimeoutError:
            raise SendTimeoutError() from None
