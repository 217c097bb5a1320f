"""Bounds on the relay's waits: one guard per stream, for the idle limit and the drain's deadline."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission.deadlines import WaitGuard
from gateway.errors import DeadlinePassed, WaitTooLong


async def _value_after(delay_s: float, value: str = "done") -> str:
    await asyncio.sleep(delay_s)
    return value


async def _guarded(guard: WaitGuard, delay_s: float, value: str = "done") -> str:
    """The pattern the relay and the response use around each read and write."""
    guard.begin()
    try:
        return await _value_after(delay_s, value)
    except asyncio.CancelledError:
        guard.raise_if_cut()
        raise
    finally:
        guard.end()


def test_a_wait_in_progress_is_cut_at_the_deadline_and_later_waits_fail_at_once() -> None:
    async def scenario() -> tuple[float, bool]:
        loop = asyncio.get_running_loop()
        guard = WaitGuard()
        assert await _guarded(guard, 0.01) == "done"  # no deadline set: a plain await
        started = loop.time()
        guard.end_by(started + 0.1)
        with pytest.raises(DeadlinePassed):
            await _guarded(guard, 5.0)
        took = loop.time() - started
        with pytest.raises(DeadlinePassed):
            await _guarded(guard, 0.0)
        guard.close()
        current = asyncio.current_task()
        assert current is not None
        return took, current.cancelling() == 0

    took, not_left_cancelling = asyncio.run(scenario())
    assert 0.09 <= took < 1.0
    assert not_left_cancelling


def test_a_wait_that_ends_before_the_deadline_keeps_its_value_and_a_closed_guard_never_fires() -> None:
    async def scenario() -> str:
        guard = WaitGuard()
        guard.end_by(asyncio.get_running_loop().time() + 0.2)
        value = await _guarded(guard, 0.01, "early")
        guard.close()
        await asyncio.sleep(0.3)
        assert not guard.passed
        return value

    assert asyncio.run(scenario()) == "early"


def test_a_deadline_that_passes_between_waits_fails_the_next_one_without_cutting_anything() -> None:
    async def scenario() -> None:
        guard = WaitGuard()
        guard.end_by(asyncio.get_running_loop().time() + 0.05)
        await asyncio.sleep(0.1)  # not inside a guarded wait: nothing is cancelled
        assert guard.passed
        with pytest.raises(DeadlinePassed):
            await _guarded(guard, 0.0)

    asyncio.run(scenario())


def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    async def scenario() -> None:
        guard = WaitGuard(5.0)
        guard.end_by(asyncio.get_running_loop().time() + 5.0)
        try:
            task = asyncio.ensure_future(_guarded(guard, 5.0))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            guard.close()

    asyncio.run(scenario())


def test_the_limit_cuts_only_a_wait_longer_than_itself() -> None:
    async def scenario() -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        guard = WaitGuard(0.2)
        try:
            # Many short waits, together longer than the limit: none is cut.
            quick = [await _guarded(guard, 0.02, str(index)) for index in range(15)]
            started = loop.time()
            with pytest.raises(WaitTooLong):
                await _guarded(guard, 5.0)
            return quick, loop.time() - started
        finally:
            guard.close()

    quick, took = asyncio.run(scenario())
    assert quick == [str(index) for index in range(15)]
    assert 0.2 <= took < 0.2 * 1.25 + 0.2


def test_a_renewed_wait_runs_on_past_the_limit_and_is_cut_once_renewals_stop() -> None:
    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        guard = WaitGuard(0.2)

        last_renewal = 0.0

        async def renew_until(until: float) -> None:
            nonlocal last_renewal
            while loop.time() < until:
                guard.renew()  # what the relay does for each read it relays while the stream's task waits
                last_renewal = loop.time()
                await asyncio.sleep(0.03)

        started = loop.time()
        renewing = asyncio.ensure_future(renew_until(started + 0.6))
        try:
            with pytest.raises(WaitTooLong):
                await _guarded(guard, 5.0)
            return loop.time() - started, loop.time() - last_renewal
        finally:
            renewing.cancel()
            guard.close()

    took, after_last_renewal = asyncio.run(scenario())
    assert took >= 0.6, "cut while renewed"
    assert 0.2 <= after_last_renewal < 0.2 * 1.25 + 0.2, after_last_renewal


def test_a_guard_holds_no_timer_until_its_first_wait_and_none_after_close() -> None:
    async def scenario() -> tuple[int, int, int]:
        loop = asyncio.get_running_loop()

        def timers() -> int:
            return len([handle for handle in getattr(loop, "_scheduled", []) if not handle.cancelled()])

        guard = WaitGuard(60.0)
        before = timers()
        await _guarded(guard, 0.0)
        during = timers()
        guard.close()
        return before, during, timers()

    before, during, after = asyncio.run(scenario())
    assert (before, during, after) == (0, 1, 0)
