"""Shutdown stage: on SIGTERM refuse new work, let open streams and calls run for a grace period, then end
them (a stream with a final error event, a whole call with a 503), before the server's own deadline cuts them
without a word."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

logger = logging.getLogger("specgate.drain")


class Endable(Protocol):
    """Open work that ends itself, with the gateway's shutdown error, once a loop time has passed."""

    def end_by(self, deadline: float) -> None: ...


class Drainer:
    """Knows the open streams and calls; `begin()` may be called from a signal handler or another thread."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._open: set[Endable] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: float | None = None

    @property
    def draining(self) -> bool:
        return self._deadline is not None

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

    def begin(self) -> None:
        if self._loop is None or self.draining:
            return
        self._loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        assert self._loop is not None
        deadline = self._deadline = self._loop.time() + self.grace_s
        logger.info("draining: %d open stream(s) and call(s) get %.0fs to finish", len(self._open), self.grace_s)
        for stream in self._open:
            stream.end_by(deadline)
