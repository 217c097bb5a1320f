"""Bounded concurrency with a bounded, timed queue ordered by priority class with ageing; overflow is a 429
with Retry-After.

A slot is only ever taken by `Admission.acquire()`, and what it returns, a `Ticket`, gives it back exactly once
however the request ends. `stalled()` says whether the gateway can admit at all: every slot taken and none
given back for a while (the readiness probe reports it).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
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


Waiter = tuple[float, int, "asyncio.Future[None]"]


class Admission:
    """A fixed number of slots; waiters queue by rank with ageing. A waiter of rank r is ordered as if it had
    arrived r x `ageing_s` later than it did, so a higher class goes first, yet a lower one that has waited longer
    than that difference goes before newer arrivals of the higher: every class keeps moving. `reserved` slots
    are only ever taken by rank 0 (the high class), so it finds room while the lower classes fill the rest."""

    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout_s: float, retry_after_s: int,
                 clock: Callable[[], float], ageing_s: float = 10.0, reserved: int = 0) -> None:
        self._free = max_concurrency
        self._reserved = min(reserved, max_concurrency - 1)
        self._top: list[Waiter] = []  # rank 0
        self._rest: list[Waiter] = []  # every lower rank, in one order with ageing
        self._arrivals = itertools.count()
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s
        self._retry_after_s = retry_after_s
        self._ageing_s = ageing_s
        self._clock = clock
        self.max_concurrency = max_concurrency
        self.waiting = 0
        self.held = 0
        self._last_release_at = clock()

    async def acquire(self, rank: int = 1) -> Ticket:
        """A slot now if one this rank may take is free and nobody is queued before it, else a place in the
        queue by `rank` (0 first)."""
        queue = self._top if rank == 0 else self._rest
        if self._free > self._floor(rank) and not _first_live(self._top) and (rank == 0 or not _first_live(queue)):
            self._take()
            return Ticket(self)
        if self.waiting >= self._max_queue:
            raise Overloaded("gateway queue is full; retry later", retry_after_s=self._retry_after_s)
        if len(queue) > 2 * self.waiting + 16:
            # Waiters that left are only skipped when they come up: while no slot frees, drop them here.
            queue[:] = [entry for entry in queue if not entry[2].done()]
            heapq.heapify(queue)
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(queue, (self._clock() + rank * self._ageing_s, next(self._arrivals), handed))
        self.waiting += 1
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                await asyncio.shield(handed)
        except BaseException as exc:
            if handed.done() and not handed.cancelled():
                self._give_back()  # handed a slot just as the wait ended: the next waiter gets it
            else:
                handed.cancel()  # left in the heap, skipped when it comes up
            if isinstance(exc, TimeoutError):
                raise Overloaded(f"waited {self._queue_timeout_s:g}s for a free slot; retry later",
                                 retry_after_s=self._retry_after_s) from None
            raise
        finally:
            self.waiting -= 1
        return Ticket(self)

    def _floor(self, rank: int) -> int:
        """Free slots that must remain after a request of this rank takes one, less one."""
        return 0 if rank == 0 else self._reserved

    def _take(self) -> None:
        self._free -= 1
        self.held += 1

    def _give_back(self) -> None:
        self._last_release_at = self._clock()
        self.held -= 1
        self._free += 1
        while True:
            top, rest = _first_live(self._top), _first_live(self._rest)
            eligible = [waiter for waiter, rank in ((top, 0), (rest, 1))
                        if waiter is not None and self._free > self._floor(rank)]
            if not eligible:
                return
            chosen = min(eligible)
            heapq.heappop(self._top if chosen is top else self._rest)
            self._take()
            chosen[2].set_result(None)

    def stalled(self, for_s: float) -> bool:
        """Every slot is taken and none has been given back for `for_s`: a new request could only wait."""
        return self.held >= self.max_concurrency and self._clock() - self._last_release_at >= for_s


def _first_live(queue: list[Waiter]) -> Waiter | None:
    """The queue's first waiter still waiting; those that left are dropped on the way."""
    while queue and queue[0][2].done():
        heapq.heappop(queue)
    return queue[0] if queue else None


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
