"""Admit stage: bounded concurrency with a bounded, timed queue; overflow is a 429 with Retry-After."""

from __future__ import annotations

import asyncio

from gateway.errors import Overloaded


class Ticket:
    """A held admission slot; released exactly once however the request ends."""

    __slots__ = ("_admission", "_released")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._semaphore.release()


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout_s: float, retry_after_s: int) -> None:
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s
        self._retry_after_s = retry_after_s
        self.waiting = 0

    async def acquire(self) -> Ticket:
        if not self._semaphore.locked():
            await self._semaphore.acquire()
            return Ticket(self)
        if self.waiting >= self._max_queue:
            raise Overloaded("gateway queue is full; retry later", retry_after_s=self._retry_after_s)
        self.waiting += 1
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self._queue_timeout_s)
        except TimeoutError:
            raise Overloaded(
                f"waited {self._queue_timeout_s:g}s for a free slot; retry later", retry_after_s=self._retry_after_s
            ) from None
        finally:
            self.waiting -= 1
        return Ticket(self)
