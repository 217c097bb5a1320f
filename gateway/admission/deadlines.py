"""Time bounds on a request's waits: the first-token budget, and `WaitGuard` (one timer per stream, not per wait).

`asyncio.timeout` builds a Timeout and schedules and cancels a timer handle every time it is entered, and a
coroutine wrapped around each wait costs a frame per event: a cost paid on each upstream read and each client
write of a stream, for bounds that almost never fire. A `WaitGuard` arms one periodic timer per stream instead, and
the wait it bounds stays a plain `await` between `begin()` and `end()` (docs/design/performance.md, "One timer
per stream").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.errors import DeadlinePassed, WaitTooLong


@dataclass(frozen=True)
class FirstTokenBudget:
    """How long a stream may wait for a worker's first event before it is tried elsewhere: a base, plus time
    for the prompt's prefill and for the requests already waiting on that worker, never above a cap. A flat
    limit long enough for a long prompt behind a full queue would leave a short prompt on a hung worker for
    minutes."""

    base_s: float
    per_prompt_kib_s: float
    per_waiting_s: float
    cap_s: float

    def limit_s(self, body_bytes: int, waiting: float) -> float:
        scaled = self.base_s + self.per_prompt_kib_s * body_bytes / 1024 + self.per_waiting_s * max(waiting, 0.0)
        return min(self.cap_s, scaled)


class WaitGuard:
    """Bounds the successive waits of one task (the first to begin one): each at most `limit_s` (checked every
    quarter of it), and none after a deadline set by `end_by` (a wait in progress then is cut). Used inline:

        guard.begin()              # raises DeadlinePassed once the deadline has passed
        try:
            chunk = await read()
        except asyncio.CancelledError:
            guard.raise_if_cut()   # the guard's own cancel becomes WaitTooLong or DeadlinePassed
            raise                  # any other cancel (the client left) stays a cancel
        finally:
            guard.end()

    `close()` stops its timers; a guard that was never begun holds none.
    """

    __slots__ = ("_cut", "_deadline", "_loop", "_renewed", "_since", "_task", "_watch", "limit_s", "passed")

    def __init__(self, limit_s: float | None = None) -> None:
        self.limit_s = limit_s
        self.passed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[object] | None = None
        self._since: float | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._cut: type[TimeoutError] | None = None
        self._renewed = False

    def begin(self) -> None:
        if self.passed:
            raise DeadlinePassed
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            if self.limit_s is not None:
                self._watch = loop.call_later(self.limit_s / 4, self._check)
            self._task = asyncio.current_task()
        self._since = loop.time()
        self._renewed = False  # activity during an earlier wait does not extend this one

    def end(self) -> None:
        self._since = None

    def renew(self) -> None:
        """The wait in progress saw activity (bytes relayed while it waits): its time starts again at the next
        check, so a wait that then sees none is cut within 1.25 limits of its last activity. A flag rather than
        a clock read: this runs for every relayed read."""
        self._renewed = True

    def raise_if_cut(self) -> None:
        """In a CancelledError handler: if this guard made the cancel, take it back and raise its timeout."""
        cut, self._cut = self._cut, None
        if cut is not None and self._task is not None and self._task.uncancel() == 0:
            raise cut

    def end_by(self, when: float) -> None:
        """Set the deadline (a loop time); called on the event loop's thread."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_at(when, self._deadline_passed)

    def close(self) -> None:
        for handle in (self._watch, self._deadline):
            if handle is not None:
                handle.cancel()
        self._watch = self._deadline = None
        self._since = None

    def _check(self) -> None:
        assert self._loop is not None and self.limit_s is not None
        since = self._since
        if since is not None:
            now = self._loop.time()
            if self._renewed:
                self._since = now
            elif now - since >= self.limit_s:
                self._cut_wait(WaitTooLong)
        self._renewed = False
        self._watch = self._loop.call_later(self.limit_s / 4, self._check)

    def _deadline_passed(self) -> None:
        self._deadline = None
        self.passed = True
        if self._since is not None:
            self._cut_wait(DeadlinePassed)

    def _cut_wait(self, timeout: type[TimeoutError]) -> None:
        task = self._task
        if self._cut is None and task is not None and not task.done():
            self._cut = timeout
            task.cancel()
