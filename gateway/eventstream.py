"""Response stage: sse-starlette's EventSourceResponse, run with less machinery per stream.

Two of sse-starlette's per-stream costs showed in profiles (loadtest/results/profile.md): an anyio cancel
scope around every write, and an anyio task group of four tasks for every response (its largest
per-request cost, ~15 % of the gateway's CPU on short requests). Here one watchdog timer bounds the writes
(gateway/cutoff.py), and the stream, the disconnect listener and the ping run as plain asyncio tasks.
sse-starlette's own shutdown listener is not started: the gateway's drainer ends streams on shutdown with
an error event (gateway/drain.py). The sending, pings and disconnect detection are sse-starlette's code.
"""

from __future__ import annotations

import asyncio
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
        if scope["type"] != "http" or scope["method"].upper() == "HEAD" or self.data_sender_callable:
            await super().__call__(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        streaming = loop.create_task(self._stream_response(send))
        tasks = {streaming, loop.create_task(self._listen_for_disconnect(receive))}
        if self.ping_interval > 0:
            tasks.add(loop.create_task(self._ping(send)))
        if self._send_watchdog is not None:
            self._send_watchdog.start()
        try:
            # Whichever ends first ends the response: the stream finished or failed, or the client left.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            # Cancelled, the stream task closes the relay, which closes the worker request and records it.
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._send_watchdog is not None:
                self._send_watchdog.stop()
        for task in (streaming, *tasks):
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
        if self.background is not None:
            await self.background()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self._send_watchdog is None:
            await send(message)
            return
        try:
            await self._send_watchdog.wait(send(message))
        except TimeoutError:
            raise SendTimeoutError() from None
