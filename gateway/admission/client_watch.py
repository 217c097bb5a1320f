"""Watches a request's client from admission to the end of its response, on one task.

When the client leaves, the watcher cancels the request's own task: whatever it waits on (the queue, the
worker's status line, the first token, a non-streaming call, a stream write) unwinds, and that wait's
cleanup closes the worker request. The work stays in the request's task rather than racing a work task
against a watcher task: each hand-off between tasks costs an event-loop turn, which under load adds to the
time to first token (docs/design/performance.md, "Event-loop turns on the request path").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from starlette.types import Receive

from gateway.errors import ClientDisconnected


class ClientWatch:
    """One watcher task per request; `guard()` turns its cancellation into ClientDisconnected."""

    __slots__ = ("_claimed", "_owner", "_receive", "_watcher", "client_left")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._owner: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._claimed = False
        self.client_left = False

    def start(self) -> None:
        """Watch from now on; call after the request body has been read (the watcher takes receive())."""
        self._owner = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                break
        self._watcher = None
        self.client_left = True
        if self._owner is not None:
            self._owner.cancel()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Within this block, the client leaving raises ClientDisconnected; other cancellations pass."""
        try:
            yield
        except asyncio.CancelledError:
            owner = asyncio.current_task()
            if owner is None or owner is not self._owner or not self.client_left or self._claimed:
                raise
            self._claimed = True
            owner.uncancel()
            raise ClientDisconnected() from None

    async def stop(self) -> None:
        """Stop watching: before the response's last message, which uvicorn answers with a disconnect.

        A client that left just before still has its cancellation pending on the task; it is taken here, as
        ClientDisconnected, rather than at some later wait outside any guard.
        """
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.client_left and not self._claimed:
            with self.guard():
                await asyncio.sleep(0)
