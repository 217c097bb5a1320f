"""`RedisLimitStore`: the limit store shared by every gateway replica, in Redis (standalone or Cluster).

Each change to an API key's state is one Lua script (gateway/tenants/store/redis_scripts.py, run by EVALSHA), so it
is atomic across replicas: two gateways sharing one Redis enforce one limit exactly. The scripts read Redis's own
clock, so replicas with skewed clocks agree. All keys of one API key carry the hash tag `{name}`: each script touches
one Cluster slot. The registry of names that `usage` enumerates is a separate key, touched outside the scripts, at
most every `_TOUCH_EVERY_S` per name and process; `usage` looks back further than that.

Any Redis error, refused connection or timeout raises `StoreUnavailable` within 2 * timeout_s (the deadline covers
connect + one command); nothing retries, so a caller is never held. `ping` answers False instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.tenants.store.base import (
    CONCURRENCY_RETRY_S,
    USAGE_RETENTION_S,
    WINDOW_S,
    Decision,
    LimitSpec,
    StoreUnavailable,
    UsageTotals,
    minute_of,
    retention_minutes,
)
from gateway.tenants.store.redis_scripts import (
    ADMIT,
    CHARGE,
    FINISH,
    RECONCILE,
    REFUSED,
    SUFFIXES,
    TOUCH,
    USAGE,
)

_T = TypeVar("_T")
_US = 1_000_000
_TOUCH_EVERY_S = 10.0


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisLimitStore:
    """`LimitStore` on Redis, shared by replicas; see gateway/tenants/store/base.py for the contract."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "specgate:",
        timeout_s: float = 0.25,
        usage_retention_s: int = USAGE_RETENTION_S,
        window_s: float = WINDOW_S,
    ) -> None:
        # No retries: a store that cannot answer now must say so now, the caller decides fail-open or closed.
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._prefix = prefix
        self._names = f"{prefix}names"
        self._deadline = 2 * timeout_s  # connect + one command; a hung server cannot hold a caller longer
        self._window_us = round(window_s * _US)
        self._retention_min = retention_minutes(usage_retention_s)
        self._retention_s = usage_retention_s
        self._touched: dict[str, float] = {}
        self._admit = self._redis.register_script(ADMIT)
        self._charge = self._redis.register_script(CHARGE)
        self._reconcile = self._redis.register_script(RECONCILE)
        self._finish = self._redis.register_script(FINISH)
        self._refused = self._redis.register_script(REFUSED)
        self._usage = self._redis.register_script(USAGE)
        self._touch = self._redis.register_script(TOUCH)

    def _keys(self, name: str) -> list[str]:
        return [f"{self._prefix}{{{name}}}:{suffix}" for suffix in SUFFIXES]

    async def _call(self, op: Awaitable[_T], deadline: float | None = None) -> _T:
        try:
            async with asyncio.timeout(deadline or self._deadline):
                return await op
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis limit store: {type(exc).__name__}: {exc}") from exc

    async def _script(self, script: Any, name: str, *args: str | int) -> Any:
        return await self._call(self._registered_then(script, name, args))

    async def _registered_then(self, script: Any, name: str, args: tuple[str | int, ...]) -> Any:
        # The registry only lists names for `usage`: a few seconds stale is fine, its reader looks back further.
        now = time.monotonic()
        if now - self._touched.get(name, float("-inf")) >= _TOUCH_EVERY_S:
            await self._touch(keys=[self._names], args=[name, self._retention_s + 3600])
            if len(self._touched) > 10_000:
                self._touched.clear()
            self._touched[name] = now
        return await script(keys=self._keys(name), args=[self._window_us, self._retention_min, *args])

    async def admit(self, key: str, spec: LimitSpec, request_id: str, prompt_tokens: int, lease_s: float) -> Decision:
        limits = (spec.rpm, spec.tpm, spec.max_concurrent, spec.daily_tokens)
        answer = await self._script(
            self._admit, key, request_id, max(0, prompt_tokens), round(lease_s * _US), *map(_limit, limits)
        )
        reason, retry_us, in_window, used, requests_reset_us, tokens_reset_us = answer
        retry: float | None = None if retry_us < 0 else retry_us / _US
        if reason == "concurrency" and retry is not None:
            retry = CONCURRENCY_RETRY_S
        return Decision(
            admitted=reason == "",
            reason=reason or None,
            retry_after_s=retry,
            requests_remaining=None if spec.rpm is None else max(0, spec.rpm - in_window),
            requests_reset_s=requests_reset_us / _US,
            tokens_remaining=None if spec.tpm is None else max(0, spec.tpm - used),
            tokens_reset_s=tokens_reset_us / _US,
        )

    async def charge(self, key: str, request_id: str, output_tokens: int) -> None:
        if output_tokens > 0:
            await self._script(self._charge, key, output_tokens)

    async def reconcile_prompt(self, key: str, request_id: str, prompt_tokens: int) -> None:
        await self._script(self._reconcile, key, request_id, max(0, prompt_tokens))

    async def release(self, key: str, request_id: str) -> None:
        await self._call(self._redis.zrem(self._keys(key)[SUFFIXES.index("l")], request_id))

    async def finish(self, key: str, request_id: str, prompt_tokens: int | None, output_tokens: int) -> None:
        prompt = -1 if prompt_tokens is None else max(0, prompt_tokens)
        await self._script(self._finish, key, request_id, prompt, max(0, output_tokens))

    async def refused(self, key: str) -> None:
        await self._script(self._refused, key)

    async def usage(self, start: float, end: float) -> dict[str, UsageTotals]:
        # Three round trips (names, SCRIPT EXISTS, the pipeline): off the request path, so a longer deadline.
        return await self._call(self._read_usage(start, end), 2 * self._deadline)

    async def _read_usage(self, start: float, end: float) -> dict[str, UsageTotals]:
        # A name's registry score is its last touch: at most _TOUCH_EVERY_S before its last write, which may be up
        # to a minute before `start` and still land in start's minute bucket; a minute more for clock skew.
        since = start - 60 - _TOUCH_EVERY_S - 60
        names = [str(name) for name in await self._redis.zrangebyscore(self._names, since, "+inf")]
        if not names:
            return {}
        u, um = SUFFIXES.index("u"), SUFFIXES.index("um")
        args = [minute_of(start), minute_of(end), self._retention_min]
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                keys = self._keys(name)
                await self._usage(keys=[keys[u], keys[um]], args=args, client=pipe)
            rows: list[list[int]] = await pipe.execute()
        return {name: UsageTotals(*row[1:]) for name, row in zip(names, rows, strict=True) if row[0] > 0}

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self._redis.ping()))
        except StoreUnavailable:
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()
