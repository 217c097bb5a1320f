"""`MemoryLimitStore`: the limit store for one gateway process, in its own memory.

Every method is `async def` but never awaits, so each call runs to its end in one event-loop step: calls are atomic
with respect to each other without a lock. Time is the injected `clock` (unix seconds), made non-decreasing here so
a stepped-back wall clock cannot reorder the windows.

Memory is bounded: per key, only the entries inside the window, the leases, the prompt records that
`reconcile_prompt` may still need (max(window, lease_s) after admission), today's counter, and the usage buckets
within retention. Keys not touched are swept once per window so an idle key leaves nothing behind.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.tenants.store.base import (
    CONCURRENCY_RETRY_S,
    USAGE_RETENTION_S,
    WINDOW_S,
    Decision,
    LimitSpec,
    UsageTotals,
    minute_of,
    retention_minutes,
    seconds_to_utc_midnight,
    utc_day,
)

_REQUESTS, _PROMPT, _OUTPUT, _REFUSED = range(4)


@dataclass(slots=True)
class _Entry:
    at: float
    cost: int


@dataclass(slots=True)
class _Prompt:
    entry: _Entry
    keep_until: float


@dataclass(slots=True)
class _KeyState:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[_Entry] = field(default_factory=deque)
    token_sum: int = 0
    prompts: dict[str, _Prompt] = field(default_factory=dict)
    prompt_expiry: list[tuple[float, int, str]] = field(default_factory=list)
    leases: dict[str, float] = field(default_factory=dict)
    day: int = 0
    day_tokens: int = 0

    def idle(self, today: int) -> bool:
        live_day = self.day == today and self.day_tokens != 0
        return not (self.requests or self.tokens or self.prompts or self.leases or live_day)


@dataclass(slots=True)
class _Usage:
    buckets: dict[int, list[int]] = field(default_factory=dict)
    minutes: list[int] = field(default_factory=list)  # heap of the buckets' minutes, oldest first


class MemoryLimitStore:
    """In-process `LimitStore` (one gateway); see gateway/tenants/store/base.py for the contract."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        window_s: float = WINDOW_S,
        usage_retention_s: int = USAGE_RETENTION_S,
    ) -> None:
        self._clock = clock
        self._window = window_s
        self._retention_min = retention_minutes(usage_retention_s)
        self._keys: dict[str, _KeyState] = {}
        self._usage: dict[str, _Usage] = {}
        self._last_now = 0.0
        self._next_sweep = 0.0
        self._seq = itertools.count()  # breaks ties in the prompt expiry heap

    def _now(self) -> float:
        self._last_now = max(self._last_now, self._clock())
        now = self._last_now
        if now >= self._next_sweep:
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._window
        today = utc_day(now)
        for key in list(self._keys):
            state = self._keys[key]
            self._prune(state, now)
            if state.idle(today):
                del self._keys[key]
        for key in list(self._usage):
            usage = self._usage[key]
            self._prune_usage(usage, minute_of(now))
            if not usage.buckets:
                del self._usage[key]

    def _state(self, key: str, now: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState(day=utc_day(now))
        self._prune(state, now)
        return state

    def _prune(self, state: _KeyState, now: float) -> None:
        # Same comparisons as the Redis scripts: out of the window when at <= now - window, lease over at deadline.
        horizon = now - self._window
        while state.requests and state.requests[0] <= horizon:
            state.requests.popleft()
        while state.tokens and state.tokens[0].at <= horizon:
            state.token_sum -= state.tokens.popleft().cost
        for request_id in [r for r, deadline in state.leases.items() if deadline <= now]:
            del state.leases[request_id]
        while state.prompt_expiry and state.prompt_expiry[0][0] <= now:
            _, _, request_id = heapq.heappop(state.prompt_expiry)
            prompt = state.prompts.get(request_id)
            if prompt is not None and prompt.keep_until <= now:  # a re-admitted id has a later record
                del state.prompts[request_id]
        today = utc_day(now)
        if state.day != today:
            state.day, state.day_tokens = today, 0

    def _prune_usage(self, usage: _Usage, current_minute: int) -> None:
        oldest = current_minute - self._retention_min
        while usage.minutes and usage.minutes[0] < oldest:
            usage.buckets.pop(heapq.heappop(usage.minutes), None)

    def _add_usage(self, key: str, now: float, minute: int, column: int, n: int) -> None:
        current = minute_of(now)
        if n == 0 or minute < current - self._retention_min:
            return
        usage = self._usage.get(key)
        if usage is None:
            usage = self._usage[key] = _Usage()
        bucket = usage.buckets.get(minute)
        if bucket is None:
            bucket = usage.buckets[minute] = [0, 0, 0, 0]
            heapq.heappush(usage.minutes, minute)
            self._prune_usage(usage, current)
        bucket[column] += n

    async def admit(self, key: str, spec: LimitSpec, request_id: str, prompt_tokens: int, lease_s: float) -> Decision:
        now = self._now()
        state = self._state(key, now)
        prompt = max(0, prompt_tokens)
        reason: str | None = None
        retry: float | None = 0.0
        if spec.max_concurrent is not None and len(state.leases) >= spec.max_concurrent:
            reason, retry = "concurrency", CONCURRENCY_RETRY_S
        elif spec.rpm is not None and len(state.requests) >= spec.rpm:
            reason, retry = "requests", None
            if spec.rpm > 0:
                # The count drops below rpm once the (count - rpm + 1) oldest entries have left.
                retry = state.requests[len(state.requests) - spec.rpm] + self._window - now
        elif spec.tpm is not None and state.token_sum + prompt > spec.tpm:
            reason, retry = "tokens", None
            if prompt <= spec.tpm:
                retry = self._tokens_retry(state, state.token_sum + prompt - spec.tpm, now)
        elif spec.daily_tokens is not None and state.day_tokens + prompt > spec.daily_tokens:
            reason, retry = "daily_tokens", seconds_to_utc_midnight(now)
        if reason is None:
            entry = _Entry(now, prompt)
            state.requests.append(now)
            state.tokens.append(entry)
            state.token_sum += prompt
            state.day_tokens += prompt
            keep_until = now + max(self._window, lease_s)
            state.prompts[request_id] = _Prompt(entry, keep_until)
            heapq.heappush(state.prompt_expiry, (keep_until, next(self._seq), request_id))
            if spec.max_concurrent is not None:
                state.leases[request_id] = now + lease_s
            minute = minute_of(now)
            self._add_usage(key, now, minute, _REQUESTS, 1)
            self._add_usage(key, now, minute, _PROMPT, prompt)
        return self._decision(state, spec, reason, retry, now)

    def _tokens_retry(self, state: _KeyState, excess: int, now: float) -> float:
        freed = 0
        for entry in state.tokens:
            freed += entry.cost
            if freed >= excess:
                return entry.at + self._window - now
        return self._window  # unreachable while token_sum is the sum of the entries

    def _decision(
        self, state: _KeyState, spec: LimitSpec, reason: str | None, retry: float | None, now: float
    ) -> Decision:
        requests_reset = state.requests[-1] + self._window - now if state.requests else 0.0
        tokens_reset = state.tokens[-1].at + self._window - now if state.token_sum > 0 and state.tokens else 0.0
        return Decision(
            admitted=reason is None,
            reason=reason,
            retry_after_s=retry,
            requests_remaining=None if spec.rpm is None else max(0, spec.rpm - len(state.requests)),
            requests_reset_s=requests_reset,
            tokens_remaining=None if spec.tpm is None else max(0, spec.tpm - state.token_sum),
            tokens_reset_s=tokens_reset,
        )

    async def charge(self, key: str, request_id: str, output_tokens: int) -> None:
        if output_tokens <= 0:
            return
        now = self._now()
        state = self._state(key, now)
        state.tokens.append(_Entry(now, output_tokens))
        state.token_sum += output_tokens
        state.day_tokens += output_tokens
        self._add_usage(key, now, minute_of(now), _OUTPUT, output_tokens)

    async def reconcile_prompt(self, key: str, request_id: str, prompt_tokens: int) -> None:
        now = self._now()
        state = self._state(key, now)
        record = state.prompts.get(request_id)
        if record is None:
            return
        entry = record.entry
        diff = max(0, prompt_tokens) - entry.cost
        if diff == 0:
            return
        if entry.at > now - self._window:  # still in the window: the running sum holds its cost
            state.token_sum += diff
        entry.cost += diff
        if utc_day(entry.at) == state.day:
            state.day_tokens += diff
        self._add_usage(key, now, minute_of(entry.at), _PROMPT, diff)

    async def finish(self, key: str, request_id: str, prompt_tokens: int | None, output_tokens: int) -> None:
        await self.release(key, request_id)
        if prompt_tokens is not None:
            await self.reconcile_prompt(key, request_id, prompt_tokens)
        await self.charge(key, request_id, output_tokens)

    async def release(self, key: str, request_id: str) -> None:
        state = self._keys.get(key)
        if state is not None:
            state.leases.pop(request_id, None)

    async def refused(self, key: str) -> None:
        now = self._now()
        self._add_usage(key, now, minute_of(now), _REFUSED, 1)

    async def usage(self, start: float, end: float) -> dict[str, UsageTotals]:
        now = self._now()
        first, last = minute_of(start), minute_of(end)
        oldest = minute_of(now) - self._retention_min
        totals: dict[str, UsageTotals] = {}
        for key, usage in self._usage.items():
            sums = [0, 0, 0, 0]
            found = False
            for minute, bucket in usage.buckets.items():
                if first <= minute <= last and minute >= oldest:
                    found = True
                    sums = [a + b for a, b in zip(sums, bucket, strict=True)]
            if found:
                totals[key] = UsageTotals(*sums)
        return totals

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._keys.clear()
        self._usage.clear()
