"""Timing stage: bounds on the relay's per-event waits without a timer per wait.

`asyncio.timeout` builds a Timeout and schedules and cancels a timer handle every time it is entered. Around
each upstream read and each client write of a stream that was ~7 % of the gateway's CPU under load
(loadtest/results/profile.md), for bounds that almost never fire. Here a stream arms one timer: a deadline
(`Deadline`, for the shutdown drain) or a periodic watchdog (`WaitWatchdog`, for a reader that stops taking
bytes). Either cancels the waiting task when its bound passes, and the wait raises TimeoutError instead, as
`asyncio.timeout` would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def _await_cuttable(awaitable: Awaitable[T], task: asyncio.Task[object], cut: set[asyncio.Task[object]]) -> T:
    try:
        return await awaitable
    except asyncio.CancelledError:
        # Only our own cancel becomes a TimeoutError; one from anywhere else (the client left) stays a cancel.
        if task in cut:
            cut.discard(task)
            if task.uncancel() == 0:
                raise TimeoutError from None
        raise


class Deadline:
    """A loop time after which waits fail: a wait in progress is cut then, later ones fail at once."""

    __slots__ = ("_cut", "_handle", "_waiting", "passed")

    def __init__(self) -> None:
        self.passed = False
        self._waiting: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._cut: set[asyncio.Task[object]] = set()

    def set(self, when: float) -> None:
        """Called on the event loop's thread (the drainer schedules itself there)."""
        if self._handle is not None:
            self._handle.cancel()
        self._handle = asyncio.get_running_loop().call_at(when, self._fire)

    def clear(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self.passed = True
        if self._waiting is not None and not self._waiting.done():
            self._cut.add(self._waiting)
            self._waiting.cancel()

    async def wait(self, awaitable: Awaitable[T]) -> T:
        if self.passed:
            # The deadline has passed; close the awaitable we will not await (a coroutine would warn).
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()
            raise TimeoutError
        task = asyncio.current_task()
        assert task is not None
        self._waiting = task
        try:
            return await _await_cuttable(awaitable, task, self._cut)
        finally:
            self._waiting = None


class WaitWatchdog:
    """Cuts any wait that lasts longer than `limit_s`, checked every quarter of the limit by one timer."""

    __slots__ = ("_cut", "_handle", "_loop", "_waiting", "limit_s")

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[asyncio.Task[object], float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._cut: set[asyncio.Task[object]] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None

    def _schedule(self) -> None:
        assert self._loop is not None
        self._handle = self._loop.call_later(self.limit_s / 4, self._check)

    def _check(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for task, since in list(self._waiting.items()):
            if now - since >= self.limit_s and task not in self._cut:
                self._cut.add(task)
                task.cancel()
        self._schedule()

    async def wait(self, awaitable: Awaitable[T]) -> T:
        task = asyncio.current_task()
        if self._loop is None or task is None:
            return await awaitable  # not started: nothing to watch with
        self._waiting[task] = self._loop.time()
        try:
            return await _await_cuttable(awaitable, task, self._cut)
        finally:
            self._waiting.pop(task, None)
