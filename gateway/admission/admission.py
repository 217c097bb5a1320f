"""Bounded concurrency with a bounded, timed queue; overflow is a 429 with Retry-After.

A slot is only ever taken by `Admission.acquire()`, and what it returns, a `Ticket`, gives it back exactly once
however the request ends. `stalled()` says whether the gateway can admit at all: every slot taken and none
given back for a while (the readiness probe reports it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import Gauge

from gateway.errors import Overloaded
from gateway.observability.record import RequestRecord


class Ticket:
    """A held admission slot; released exactly once however the request ends."""

    __slots__ = ("_admission", "_released")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._give_back()


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout_s: float, retry_after_s: int,
                 clock: Callable[[], float]) -> None:
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s
        self._retry_after_s = retry_after_s
        self._clock = clock
        self.max_concurrency = max_concurrency
        self.waiting = 0
        self.held = 0
        self._last_release_at = clock()

    async def acquire(self) -> Ticket:
        if not self._semaphore.locked():
            await self._semaphore.acquire()
            return self._issued()
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
        return self._issued()

    def _issued(self) -> Ticket:
        self.held += 1
        return Ticket(self)

    def _give_back(self) -> None:
        self.held -= 1
        self._last_release_at = self._clock()
        self._semaphore.release()

    def stalled(self, for_s: float) -> bool:
        """Every slot is taken and none has been given back for `for_s`: a new request could only wait."""
        return self.held >= self.max_concurrency and self._clock() - self._last_release_at >= for_s


class AdmittedRequest:
    """What an admitted request holds (its slot, its in-flight count) and its accounting, given back and done
    exactly once, however the request ends."""

    __slots__ = ("_account", "_closed", "_in_flight", "_ticket")

    def __init__(self, ticket: Ticket, in_flight: Gauge, account: Callable[[RequestRecord], None]) -> None:
        self._ticket = ticket
        self._in_flight = in_flight
        self._account = account
        self._closed = False
        in_flight.inc()

    def close(self, record: RequestRecord) -> None:
        if self._closed:
            return
        self._closed = True
        self._ticket.release()
        self._in_flight.dec()
        self._account(record)
