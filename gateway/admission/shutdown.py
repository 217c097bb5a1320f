"""The shutdown drain: on SIGTERM, new work refused and open streams and calls given a grace period, then ended.

Once the grace has run out, a stream ends with a final error event and a whole call with a 503, before the
server's own deadline would cut them without a word.

While it drains the gateway keeps accepting connections: `/ready` answers 503, new requests 503 with
Retry-After, and every answer carries `connection: close`, so load balancers and keep-alive clients move on.
`begin(on_drained)` calls `on_drained` once every open stream and call has ended (or the grace has run out) and
at least `notice_s` has passed since the drain began (time for a load balancer to see `/ready` fail)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger("specgate.shutdown")

POLL_S = 0.05
ENDING_MARGIN_S = 1.0


class Endable(Protocol):
    """Open work that ends itself, with the gateway's shutdown error, once a loop time has passed."""

    def end_by(self, deadline: float) -> None: ...


class Drainer:
    """Knows the open streams and calls; `begin()` may be called from a signal handler or another thread."""

    def __init__(self, grace_s: float, notice_s: float = 0.0) -> None:
        self.grace_s = grace_s
        self.notice_s = notice_s
        self._open: set[Endable] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: float | None = None
        self._waiting: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    @property
    def bound(self) -> bool:
        """The app has started: there is a loop to drain on."""
        return self._loop is not None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def track(self, stream: Endable) -> None:
        # A stream that opens during the drain (it was queued or waiting for its first token) ends at the same
        # deadline as the others: a grace of its own would outlast the server's, which cuts it without an event.
        if self._deadline is not None:
            stream.end_by(self._deadline)
        self._open.add(stream)

    def untrack(self, stream: Endable) -> None:
        self._open.discard(stream)

    def begin(self, on_drained: Callable[[], None] | None = None) -> None:
        if self._loop is None or self.draining:
            return
        self._loop.call_soon_threadsafe(self._begin, on_drained)

    def _begin(self, on_drained: Callable[[], None] | None) -> None:
        assert self._loop is not None
        if self._deadline is not None:
            return
        began = self._loop.time()
        deadline = self._deadline = began + self.grace_s
        logger.info("draining: %d open stream(s) and call(s) get %.0fs to finish", len(self._open), self.grace_s)
        for stream in self._open:
            stream.end_by(deadline)
        if on_drained is not None:
            self._waiting = self._loop.create_task(self._until_drained(began, on_drained), name="specgate-drain")

    async def _until_drained(self, began: float, on_drained: Callable[[], None]) -> None:
        assert self._loop is not None and self._deadline is not None
        # Work cut at the deadline ends itself (an error event, a 503) within a moment: wait for that too.
        last_call = self._deadline + ENDING_MARGIN_S
        while True:
            now = self._loop.time()
            if now >= began + self.notice_s and (not self._open or now >= last_call):
                break
            await asyncio.sleep(POLL_S)
        logger.info("drained: %d open stream(s) and call(s) left", len(self._open))
        on_drained()
