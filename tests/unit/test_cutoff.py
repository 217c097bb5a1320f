"""Bounds on the relay's waits: a deadline for the drain and a watchdog for stuck writes."""

from __future__ import annotations

import asyncio

import pytest

from gateway.cutoff import Deadline, WaitWatchdog


async def _value_after(delay_s: float, value: str = "done") -> str:
    await asyncio.sleep(delay_s)
    return value


def test_a_wait_in_progress_is_cut_at_the_deadline_and_later_waits_fail_at_once() -> None:
    async def scenario() -> tuple[float, bool]:
        loop = asyncio.get_running_loop()
        deadline = Deadline()
        assert await deadline.wait(_value_after(0.01)) == "done"  # no deadline set: plain await
        started = loop.time()
        deadline.set(started + 0.1)
        with pytest.raises(TimeoutError):
            await deadline.wait(_value_after(5.0))
        took = loop.time() - started
        with pytest.raises(TimeoutError):
            await deadline.wait(_value_after(0.0))
        current = asyncio.current_task()
        assert current is not None
        return took, current.cancelling() == 0

    took, not_left_cancelling = asyncio.run(scenario())
    assert 0.09 <= took < 1.0
    assert not_left_cancelling


def test_a_wait_that_ends_before_the_deadline_keeps_its_value_and_the_timer_is_cleared() -> None:
    async def scenario() -> str:
        deadline = Deadline()
        deadline.set(asyncio.get_running_loop().time() + 0.2)
        value = await deadline.wait(_value_after(0.01, "early"))
        deadline.clear()
        await asyncio.sleep(0.3)  # a cleared deadline never fires
        assert not deadline.passed
        return value

    assert asyncio.run(scenario()) == "early"


def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    async def scenario() -> None:
        deadline = Deadline()
        deadline.set(asyncio.get_running_loop().time() + 5.0)
        watchdog = WaitWatchdog(5.0)
        watchdog.start()
        try:
            for waiter in (deadline.wait, watchdog.wait):
                task = asyncio.ensure_future(waiter(_value_after(5.0)))
                await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        finally:
            watchdog.stop()
            deadline.clear()

    asyncio.run(scenario())


def test_the_watchdog_cuts_only_a_wait_longer_than_its_limit() -> None:
    async def scenario() -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        watchdog = WaitWatchdog(0.2)
        watchdog.start()
        try:
            # Many short waits, together longer than the limit: none is cut.
            quick = [await watchdog.wait(_value_after(0.02, str(index))) for index in range(15)]
            started = loop.time()
            with pytest.raises(TimeoutError):
                await watchdog.wait(_value_after(5.0))
            return quick, loop.time() - started
        finally:
            watchdog.stop()

    quick, took = asyncio.run(scenario())
    assert quick == [str(index) for index in range(15)]
    assert 0.2 <= took < 0.2 * 1.25 + 0.2


def test_an_unstarted_watchdog_only_awaits() -> None:
    assert asyncio.run(WaitWatchdog(0.01).wait(_value_after(0.05, "slow"))) == "slow"
