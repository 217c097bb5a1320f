"""The admission queue orders waiters by priority class with ageing, and never loses or doubles a slot."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission.admission import Admission, Ticket
from gateway.errors import Overloaded

HIGH, NORMAL, LOW = 0, 1, 2


async def _admitted_in_order(admission: Admission, holder: Ticket, waiters: list[tuple[str, int]],
                             now: list[float], arrivals: list[float]) -> list[str]:
    order: list[str] = []

    async def wait(name: str, rank: int) -> None:
        ticket = await admission.acquire(rank)
        order.append(name)
        await asyncio.sleep(0)
        ticket.release()

    tasks = []
    for (name, rank), at in zip(waiters, arrivals, strict=True):
        now[0] = at
        tasks.append(asyncio.create_task(wait(name, rank)))
        await asyncio.sleep(0)  # queued in this order
    holder.release()
    await asyncio.gather(*tasks)
    return order


@pytest.mark.anyio
async def test_waiters_are_admitted_by_class_then_arrival() -> None:
    now = [0.0]
    admission = Admission(1, 10, 5.0, 1, lambda: now[0], ageing_s=10.0)
    holder = await admission.acquire(NORMAL)
    waiters = [("low", LOW), ("normal-1", NORMAL), ("high", HIGH), ("normal-2", NORMAL)]
    order = await _admitted_in_order(admission, holder, waiters, now, [0.0, 0.1, 0.2, 0.3])
    assert order == ["high", "normal-1", "normal-2", "low"]
    assert admission.held == 0 and admission.waiting == 0


@pytest.mark.anyio
async def test_a_low_request_that_waited_long_enough_goes_before_newer_high_ones() -> None:
    """Ageing: low (rank 2) at t=0 is ordered as t=20; high at t=25 as t=25, so low first; high at t=15 first."""
    now = [0.0]
    admission = Admission(1, 10, 60.0, 1, lambda: now[0], ageing_s=10.0)
    holder = await admission.acquire(NORMAL)
    order = await _admitted_in_order(admission, holder, [("low", LOW), ("high-late", HIGH), ("high-early", HIGH)],
                                     now, [0.0, 25.0, 15.0])
    assert order == ["high-early", "low", "high-late"]


@pytest.mark.anyio
async def test_a_waiter_that_times_out_or_leaves_loses_no_slot() -> None:
    admission = Admission(1, 10, 0.05, 1, lambda: 0.0)
    holder = await admission.acquire()
    with pytest.raises(Overloaded, match="waited"):
        await admission.acquire()
    gone = asyncio.create_task(admission.acquire())
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    holder.release()
    assert admission.held == 0 and admission.waiting == 0
    tickets = [await admission.acquire()]  # the one slot is free again, and only one
    with pytest.raises(Overloaded):
        await admission.acquire()
    tickets[0].release()
    assert admission.held == 0


@pytest.mark.anyio
async def test_a_slot_handed_to_a_waiter_that_is_cancelled_before_it_runs_goes_to_the_next() -> None:
    admission = Admission(1, 10, 5.0, 1, lambda: 0.0)
    holder = await admission.acquire()
    first = asyncio.create_task(admission.acquire())
    second = asyncio.create_task(admission.acquire())
    await asyncio.sleep(0)
    holder.release()  # handed to `first`, which has not run yet
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    ticket = await asyncio.wait_for(second, 1.0)
    assert admission.held == 1
    ticket.release()
    assert admission.held == 0 and admission.waiting == 0


@pytest.mark.anyio
async def test_the_queue_bound_refuses_beyond_max_queue() -> None:
    admission = Admission(1, 1, 5.0, 3, lambda: 0.0)
    holder = await admission.acquire()
    waiting = asyncio.create_task(admission.acquire())
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="queue is full") as refused:
        await admission.acquire()
    assert refused.value.retry_after_s == 3
    holder.release()
    (await waiting).release()


@pytest.mark.anyio
async def test_reserved_slots_are_left_for_the_high_class() -> None:
    admission = Admission(3, 10, 5.0, 1, lambda: 0.0, reserved=1)
    normal = [await admission.acquire(NORMAL), await admission.acquire(NORMAL)]
    third = asyncio.create_task(admission.acquire(LOW))
    await asyncio.sleep(0)
    assert not third.done(), "the last slot is the high class's"
    high = await asyncio.wait_for(admission.acquire(HIGH), 1.0)
    high.release()
    await asyncio.sleep(0)
    assert not third.done(), "a freed reserved slot stays reserved"
    normal[0].release()
    ticket = await asyncio.wait_for(third, 1.0)
    assert admission.held == 2
    for held in (ticket, normal[1]):
        held.release()
    assert admission.held == 0 and admission.waiting == 0
