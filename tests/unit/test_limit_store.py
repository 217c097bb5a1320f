"""The limit stores keep one contract (gateway/tenants/store/base.py): the same cases run on the in-process store and
on Redis (a real redis-server). Time-dependent behaviour is proven on the memory store with a fake clock; on Redis,
time does not move within a case except in the one test that uses a sub-second window.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from gateway.tenants.store import Decision, LimitSpec, LimitStore, MemoryLimitStore, RedisLimitStore, UsageTotals
from gateway.tenants.store.base import StoreUnavailable
from tests.support import free_port
from tests.unit.redis_server import redis_server

pytestmark = pytest.mark.anyio

BASE = 28_333_334 * 60.0  # 1_700_000_040: a minute boundary, 22:14 UTC
LEASE = 900.0
Opener = Callable[[], AbstractAsyncContextManager[LimitStore]]


@dataclass
class FakeClock:
    now: float

    def __call__(self) -> float:
        return self.now


def span(store: LimitStore) -> tuple[float, float]:  # a usage range around now: the fake clock's or Redis's
    return (BASE - 60, BASE + 60) if isinstance(store, MemoryLimitStore) else (time.time() - 3600, time.time() + 60)


def about(value: float | None, expected: float, slack: float = 2.0) -> bool:  # Redis's clock moves during a case
    return value is not None and expected - slack <= value <= expected


@pytest.fixture(params=["memory", "redis"])
def open_store(request: pytest.FixtureRequest) -> Opener:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    def opened() -> AbstractAsyncContextManager[LimitStore]:
        prefix = f"t-{uuid.uuid4().hex}:"  # each case sees a Redis of its own
        return aclosing(MemoryLimitStore(FakeClock(BASE)) if url is None else RedisLimitStore(url, prefix=prefix))

    return opened


async def admit(store: LimitStore, spec: LimitSpec, rid: str, prompt: int = 0, key: str = "team-a") -> Decision:
    return await store.admit(key, spec, rid, prompt, LEASE)


async def test_admits_up_to_rpm_then_refuses_with_an_exact_retry(open_store: Opener) -> None:
    spec = LimitSpec(rpm=3)
    async with open_store() as store:
        decisions = [await admit(store, spec, f"r{i}") for i in range(3)]
        assert [d.admitted for d in decisions] == [True] * 3
        assert [d.requests_remaining for d in decisions] == [2, 1, 0]
        assert decisions[0].retry_after_s == 0.0 and decisions[0].tokens_remaining is None
        refused = await admit(store, spec, "r3")
        assert (refused.admitted, refused.reason, refused.requests_remaining) == (False, "requests", 0)
        assert about(refused.retry_after_s, 60.0) and about(refused.requests_reset_s, 60.0)  # within (58, 60]
        assert (await admit(store, spec, "other", key="team-b")).admitted  # keys are separate
        await store.refused("team-a")
        assert await store.usage(*span(store)) == {"team-a": UsageTotals(3, 0, 0, 1), "team-b": UsageTotals(1, 0, 0, 0)}


async def test_tokens_fit_until_the_window_is_full(open_store: Opener) -> None:
    spec = LimitSpec(tpm=100)
    async with open_store() as store:
        assert (await admit(store, spec, "a", 30)).tokens_remaining == 70
        assert (await admit(store, spec, "b", 50)).tokens_remaining == 20
        refused = await admit(store, spec, "c", 30)
        assert (refused.admitted, refused.reason, refused.tokens_remaining) == (False, "tokens", 20)
        assert about(refused.retry_after_s, 60.0) and about(refused.tokens_reset_s, 60.0)
        never = await admit(store, spec, "d", 101)
        assert (never.reason, never.retry_after_s) == ("tokens", None)
        exact = await admit(store, spec, "e", 20)
        assert (exact.admitted, exact.tokens_remaining) == (True, 0)


async def test_charge_is_forced_past_the_limit(open_store: Opener) -> None:
    spec = LimitSpec(tpm=100, daily_tokens=1000)
    async with open_store() as store:
        await admit(store, spec, "a", 80)
        await store.charge("team-a", "a", 50)
        await store.charge("team-a", "a", 0)  # no-op
        await store.charge("team-a", "a", -5)  # no-op
        refused = await admit(store, spec, "b", 0)
        assert (refused.reason, refused.tokens_remaining) == ("tokens", 0)
        assert about(refused.retry_after_s, 60.0)  # the 80-token prompt must leave first
        assert (await admit(store, LimitSpec(daily_tokens=130), "c", 1)).reason == "daily_tokens"  # 80 + 50 today
        assert (await admit(store, LimitSpec(daily_tokens=131), "d", 1)).admitted


async def test_reconcile_prompt_adjusts_the_window_the_day_and_usage(open_store: Opener) -> None:
    spec = LimitSpec(tpm=100)
    async with open_store() as store:
        await admit(store, spec, "a", 90)
        assert (await admit(store, spec, "b", 50)).reason == "tokens"
        await store.reconcile_prompt("team-a", "a", 40)
        await store.reconcile_prompt("team-a", "unknown", 500)  # no-op
        assert (await admit(store, spec, "b", 50)).tokens_remaining == 10
        await store.reconcile_prompt("team-a", "b", 60)
        full = await admit(store, spec, "c", 1)
        assert (full.reason, full.tokens_remaining) == ("tokens", 0)  # 40 + 60
        assert (await admit(store, LimitSpec(daily_tokens=100), "d", 1)).reason == "daily_tokens"
        assert (await store.usage(*span(store)))["team-a"] == UsageTotals(2, 100, 0, 0)


async def test_concurrency_leases(open_store: Opener) -> None:
    spec = LimitSpec(max_concurrent=2)
    async with open_store() as store:
        assert (await admit(store, spec, "a")).admitted and (await admit(store, spec, "b")).admitted
        refused = await admit(store, spec, "c")
        assert (refused.reason, refused.retry_after_s) == ("concurrency", 1.0)
        await store.release("team-a", "a")
        await store.release("team-a", "a")  # idempotent
        await store.release("team-z", "nothing")
        assert (await admit(store, spec, "c")).admitted
        assert (await admit(store, spec, "d")).reason == "concurrency"


async def test_refusal_order_is_concurrency_requests_tokens_daily(open_store: Opener) -> None:
    async with open_store() as store:
        await admit(store, LimitSpec(max_concurrent=5), "a", 10)
        for limits, reason in (((1, 1, 10, 10), "concurrency"), ((None, 1, 10, 10), "requests"),
                               ((None, None, 10, 10), "tokens"), ((None, None, None, 10), "daily_tokens")):
            spec = LimitSpec(max_concurrent=limits[0], rpm=limits[1], tpm=limits[2], daily_tokens=limits[3])
            assert (await admit(store, spec, "b", 1)).reason == reason
        assert (await admit(store, LimitSpec(rpm=0), "b")).retry_after_s is None
        assert (await store.usage(0.0, 4e9))["team-a"].requests == 1  # refusals record nothing


async def test_daily_budget_retries_at_utc_midnight(open_store: Opener) -> None:
    spec = LimitSpec(daily_tokens=100)
    async with open_store() as store:
        now = BASE if isinstance(store, MemoryLimitStore) else time.time()
        assert (await admit(store, spec, "a", 60)).admitted
        refused = await admit(store, spec, "b", 50)
        assert refused.reason == "daily_tokens"
        to_midnight = 86400 - now % 86400
        assert about(refused.retry_after_s, to_midnight)
        assert not isinstance(store, MemoryLimitStore) or refused.retry_after_s == to_midnight  # exact there
        assert (await admit(store, spec, "c", 40)).admitted


async def test_memory_window_slides_without_a_minute_boundary_burst_and_days_roll_over() -> None:
    store = MemoryLimitStore(clock := FakeClock(BASE + 30))
    spec = LimitSpec(rpm=5)
    assert all([(await admit(store, spec, f"r{i}")).admitted for i in range(5)])
    clock.now = BASE + 61  # a new calendar minute: a fixed-window limiter would admit 5 more
    refused = await admit(store, spec, "x")
    assert refused.reason == "requests" and refused.retry_after_s == pytest.approx(29.0)
    clock.now = BASE + 89.99
    assert not (await admit(store, spec, "x")).admitted
    clock.now = BASE + 90.01
    admitted = await admit(store, spec, "x")
    assert admitted.admitted and admitted.requests_remaining == 4  # all five of t=30 left together
    clock.now = 86400 * 19700 - 10.0  # 10 s to a UTC midnight
    assert (await admit(store, LimitSpec(daily_tokens=100), "a", 100)).admitted
    assert (await admit(store, LimitSpec(daily_tokens=100), "b", 1)).retry_after_s == 10.0
    clock.now += 10
    assert (await admit(store, LimitSpec(daily_tokens=100), "b", 100)).admitted  # a new day, a new budget


async def test_memory_tokens_retry_walks_the_oldest_entries() -> None:
    store = MemoryLimitStore(clock := FakeClock(BASE))
    spec = LimitSpec(tpm=100)
    for rid, prompt in (("a", 30), ("b", 50), ("c", 20)):
        assert (await admit(store, spec, rid, prompt)).admitted
        clock.now += 10
    assert (await admit(store, spec, "d", 25)).retry_after_s == pytest.approx(30.0)  # a's 30 frees enough
    assert (await admit(store, spec, "d", 60)).retry_after_s == pytest.approx(40.0)  # a and b must leave
    assert (await admit(store, spec, "d", 100)).retry_after_s == pytest.approx(50.0)  # all three
    clock.now = BASE + 60  # a left: 70 in the window
    assert (await admit(store, spec, "d", 30)).tokens_remaining == 0


async def test_memory_leases_records_and_idle_keys_expire() -> None:
    store = MemoryLimitStore(clock := FakeClock(BASE), usage_retention_s=600)
    spec = LimitSpec(max_concurrent=1)
    assert (await store.admit("team-a", spec, "a", 90, 5.0)).admitted
    clock.now += 4.99
    assert (await store.admit("team-a", spec, "b", 0, 5.0)).reason == "concurrency"
    clock.now = BASE + 5
    assert (await store.admit("team-a", spec, "b", 0, 5.0)).admitted  # a's lease ended at its deadline
    assert (await store.admit("team-c", LimitSpec(), "c", 90, 300.0)).admitted
    clock.now = BASE + 66  # c's prompt left the window; its record is kept for max(window, lease)
    await store.reconcile_prompt("team-c", "c", 10)
    late = await store.admit("team-c", LimitSpec(tpm=100, daily_tokens=100), "d", 90, 5.0)
    assert (late.admitted, late.tokens_remaining) == (True, 10)  # the window is untouched, the day holds 10 + 90
    assert await store.usage(BASE, BASE) == {"team-a": UsageTotals(2, 90, 0, 0), "team-c": UsageTotals(1, 10, 0, 0)}
    clock.now = BASE + 60 * 12  # past the usage retention (10 minutes) and every window and lease
    await store.refused("team-b")
    assert await store.usage(BASE, BASE + 60) == {}
    assert sorted(store._keys) == ["team-a", "team-c"]  # only today's daily counters are left of them
    clock.now = BASE + 86400
    assert await store.usage(0, 0) == {}
    assert store._keys == {} and store._usage == {}


async def test_stores_agree_on_the_same_sequence(redis_url: str) -> None:
    spec = LimitSpec(rpm=6, tpm=100, max_concurrent=3, daily_tokens=150)
    # (op, request, tokens): admissions of r1..r8 interleaved with a charge, releases and a reconciliation
    steps = [("admit", "r1", 40), ("admit", "r2", 30), ("charge", "r1", 20), ("admit", "r3", 20), ("release", "r1", 0),
             ("admit", "r4", 11), ("admit", "r5", 10), ("reconcile", "r1", 5), ("admit", "r6", 10),
             ("admit", "r7", 5), ("release", "r2", 0), ("admit", "r8", 25)]
    seen: list[list[tuple[object, ...]]] = []
    for store in (MemoryLimitStore(FakeClock(BASE)), RedisLimitStore(redis_url, prefix=f"t-{uuid.uuid4().hex}:")):
        seen.append([])
        for op, rid, n in steps:
            if op == "admit":
                d = await admit(store, spec, rid, n)
                seen[-1].append((d.admitted, d.reason, d.requests_remaining, d.tokens_remaining, d.retry_after_s))
            elif op == "release":
                await store.release("team-a", rid)
            else:
                await (store.charge if op == "charge" else store.reconcile_prompt)("team-a", rid, n)
        await store.aclose()
    assert [answer[:4] for answer in seen[1]] == [answer[:4] for answer in seen[0]] == [
        (True, None, 5, 60), (True, None, 4, 30), (False, "tokens", 4, 10), (False, "tokens", 4, 10),
        (True, None, 3, 0), (True, None, 2, 25), (False, "concurrency", 2, 25), (True, None, 1, 0),
    ]
    retries = [(memory[4], redis[4]) for memory, redis in zip(*seen, strict=True)]  # Redis's clock moved a little
    assert all(m == r if m != 60.0 else about(r, 60.0) for m, r in retries) and retries[2][0] == 60.0


async def test_two_replicas_admit_exactly_rpm_in_total(redis_url: str) -> None:
    prefix = f"t-{uuid.uuid4().hex}:"
    replicas = [RedisLimitStore(redis_url, prefix=prefix, timeout_s=5.0) for _ in range(2)]
    decisions = await asyncio.gather(*(admit(replicas[i % 2], LimitSpec(rpm=50), f"r{i}") for i in range(200)))
    usage = await replicas[1].usage(time.time() - 120, time.time() + 60)
    await asyncio.gather(*(replica.aclose() for replica in replicas))
    assert sum(d.admitted for d in decisions) == 50 and usage["team-a"].requests == 50
    assert {d.reason for d in decisions if not d.admitted} == {"requests"}


async def test_redis_window_and_leases_expire_in_real_time_and_keys_do_not_outlive_them(redis_url: str) -> None:
    prefix = f"t-{uuid.uuid4().hex}:"
    store = RedisLimitStore(redis_url, prefix=prefix, window_s=0.5)
    spec = LimitSpec(rpm=2, tpm=10, max_concurrent=2)
    assert (await store.admit("team-a", spec, "a", 0, 0.5)).admitted
    assert (await store.admit("team-a", spec, "b", 0, 30.0)).admitted
    assert (await store.admit("team-a", spec, "c", 0, 0.5)).reason == "concurrency"
    for _ in range(600):  # more expired entries than one Lua slice (500) and one walk batch (100)
        await store.charge("team-a", "b", 1)
    refused = await store.admit("team-a", LimitSpec(tpm=1000), "c", 1000, 0.5)
    assert refused.reason == "tokens" and refused.retry_after_s is not None and 0 < refused.retry_after_s <= 0.5
    await asyncio.sleep(0.55)
    again = await store.admit("team-a", spec, "c", 0, 0.5)  # a's lease, the requests, the 600 tokens: gone
    assert (again.admitted, again.requests_remaining, again.tokens_remaining) == (True, 1, 10)
    async with Redis.from_url(redis_url) as client:
        ttls = {key: await client.pttl(key) async for key in client.scan_iter(f"{prefix}*")}
    assert len(ttls) == 10 and all(ttl > 0 for ttl in ttls.values()), ttls
    await store.aclose()


async def expect_unavailable(call: Callable[[], Awaitable[object]], within_s: float = 1.5) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await call()
    assert time.monotonic() - started < within_s


async def test_redis_down_or_silent_raises_store_unavailable_quickly() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody ever replies
        for port in (free_port(), silent.getsockname()[1]):  # nothing listens on a free port: refused
            store = RedisLimitStore(f"redis://127.0.0.1:{port}/0")
            await expect_unavailable(lambda: admit(store, LimitSpec(rpm=1), "a"))  # noqa: B023
            await expect_unavailable(lambda: store.charge("team-a", "a", 5))  # noqa: B023
            await expect_unavailable(lambda: store.release("team-a", "a"))  # noqa: B023
            await expect_unavailable(lambda: store.usage(0, 1))  # noqa: B023
            assert await store.ping() is False
            await store.aclose()


async def test_redis_killed_mid_test_raises_store_unavailable() -> None:
    with redis_server() as (url, process):
        store = RedisLimitStore(url)
        assert (await admit(store, LimitSpec(rpm=5), "a")).admitted and await store.ping()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        await expect_unavailable(lambda: admit(store, LimitSpec(rpm=5), "b"))
        await expect_unavailable(lambda: store.refused("team-a"))
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_finish_releases_reconciles_and_charges_in_one_call(kind: str, redis_url: str) -> None:
    from gateway.tenants.store.memory import MemoryLimitStore
    from gateway.tenants.store.redis_store import RedisLimitStore

    store = MemoryLimitStore() if kind == "memory" else RedisLimitStore(redis_url, prefix=f"finish-{kind}:")
    spec = LimitSpec(tpm=100, max_concurrent=1)
    try:
        assert (await store.admit("k", spec, "r1", 10, 60.0)).admitted
        assert (await store.admit("k", spec, "r2", 10, 60.0)).reason == "concurrency"
        await store.finish("k", "r1", 30, 50)
        after = await store.admit("k", spec, "r3", 10, 60.0)
        assert after.admitted and after.tokens_remaining == 100 - 30 - 50 - 10
        usage = (await store.usage(0, 4e9))["k"]
        assert (usage.prompt_tokens, usage.output_tokens) == (40, 50)
    finally:
        await store.aclose()
