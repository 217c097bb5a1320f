"""Enforcement of a key's limits on the request path: admission against the limit store (RPM, TPM, concurrent
requests, daily budget), the 429 with its exact Retry-After and OpenAI's headers, and the `Grant` that counts what
an admitted request then uses.

Contract: a refused request never reaches a worker and is counted as refused; an admitted one is counted once,
whatever ends it: its prompt at admission (an estimate, tenants/prompt_tokens.py) set to the worker's exact count
when it ends, its output as it streams (`charge_open`, run about once a second) and what remains when it ends,
failed or cut requests included. A store that cannot answer never fails a request with a 5xx or holds it: with
`fail_open` the request goes through unlimited, else it is refused with a 429 (`limits_unavailable`); either way
the failure is logged (at most once per `LOG_EVERY_S`) and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.errors import RateLimited
from gateway.observability.record import RequestRecord
from gateway.schemas import OpenAICall
from gateway.tenants.keys_file import Tenant
from gateway.tenants.metrics import TenantMetrics
from gateway.tenants.prompt_tokens import estimate_prompt_tokens
from gateway.tenants.rate_headers import rate_limit_headers, retry_headers
from gateway.tenants.store.base import Decision, LimitSpec, LimitStore, StoreUnavailable, UsageTotals

logger = logging.getLogger("specgate.tenants")

LOG_EVERY_S = 10.0
REASON_TEXT = {
    "requests": "requests per minute (RPM)",
    "tokens": "tokens per minute (TPM)",
    "concurrency": "concurrent requests",
    "daily_tokens": "tokens per day",
}


class Grant:
    """An admitted request's hold on its key: headers for the answer, and what it has been charged so far."""

    __slots__ = ("charged_output", "headers", "limited", "request_id", "tenant", "ticks")

    def __init__(self, tenant: Tenant, request_id: str, headers: dict[str, str], limited: bool) -> None:
        self.tenant = tenant
        self.request_id = request_id
        self.headers = headers
        self.limited = limited  # counted in the store (False: the store was down and the request let through)
        self.charged_output = 0
        self.ticks = 0  # charging rounds it has been open for

    def take_uncharged(self, record: RequestRecord) -> int:
        """The output tokens produced since the last charge, counted as charged from now on."""
        used = max(record.output_tokens - self.charged_output, 0)
        self.charged_output += used
        return used


class TenantLimiter:
    """One per gateway; the store is the in-process one or Redis (tenants/store/)."""

    def __init__(self, store: LimitStore, metrics: TenantMetrics, *, fail_open: bool, lease_s: float,
                 clock: Callable[[], float]) -> None:
        self._store = store
        self._metrics = metrics
        self._fail_open = fail_open
        self._lease_s = lease_s
        self._clock = clock
        self._open: dict[str, tuple[Grant, RequestRecord]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self._last_logged = float("-inf")

    async def admit(self, tenant: Tenant, call: OpenAICall, record: RequestRecord) -> Grant:
        """The request's grant, or a RateLimited raised when its key is over a limit."""
        estimate = estimate_prompt_tokens(call)
        # Keys without limits go through the store too: it keeps every key's usage (GET /admin/usage).
        spec = LimitSpec(tenant.rpm, tenant.tpm, tenant.max_concurrent, tenant.daily_tokens)
        try:
            decision = await self._store.admit(tenant.name, spec, record.request_id, estimate, self._lease_s)
        except StoreUnavailable as exc:
            self._store_failed("admission", exc)
            if self._fail_open:
                return self._opened(Grant(tenant, record.request_id, {}, limited=False), record)
            self._metrics.refused(tenant.name, "limits_unavailable")
            raise RateLimited("rate limits cannot be checked right now; retry shortly", code="limits_unavailable",
                              retry_after_s=1) from None
        headers = rate_limit_headers(spec, decision)
        if not decision.admitted:
            await self._refused(tenant, decision, headers, estimate)
        return self._opened(Grant(tenant, record.request_id, headers, limited=True), record)

    async def _refused(self, tenant: Tenant, decision: Decision, headers: dict[str, str], estimate: int) -> None:
        reason = decision.reason or "requests"
        self._metrics.refused(tenant.name, reason)
        try:
            await self._store.refused(tenant.name)
        except StoreUnavailable as exc:
            self._store_failed("usage", exc)
        if decision.retry_after_s is None:
            raise RateLimited(f"Request too large for {REASON_TEXT[reason]}: this key's limit is {tenant.tpm}, "
                              f"the prompt is about {estimate} tokens", code="request_too_large", headers=headers)
        retry_after_s, exact = retry_headers(decision.retry_after_s)
        raise RateLimited(
            f"Rate limit reached for this key on {REASON_TEXT[reason]}; try again in {decision.retry_after_s:.3g}s",
            retry_after_s=retry_after_s, headers={**headers, **exact},
        )

    def _opened(self, grant: Grant, record: RequestRecord) -> Grant:
        record.key = grant.tenant.name
        if grant.limited:
            self._open[grant.request_id] = (grant, record)
        return grant

    def finish(self, grant: Grant, record: RequestRecord) -> None:
        """The request ended (any way): charge what it used beyond what was charged, give back its lease."""
        self._metrics.finished(record)
        if self._open.pop(grant.request_id, None) is None:
            return
        task = asyncio.get_running_loop().create_task(self._settle(grant, record))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, grant: Grant, record: RequestRecord) -> None:
        used = grant.take_uncharged(record)
        try:
            await self._store.finish(grant.tenant.name, grant.request_id, record.prompt_tokens or None, used)
        except StoreUnavailable as exc:
            self._store_failed("accounting", exc)

    async def _charge(self, grant: Grant, record: RequestRecord) -> None:
        used = grant.take_uncharged(record)
        if used > 0:
            await self._store.charge(grant.tenant.name, grant.request_id, used)

    async def charge_open(self) -> None:
        """Charge open streams the output tokens they produced since the last call. A request is first charged
        at the second round it is open for: most end sooner, and are charged once, when they end."""
        for grant, record in list(self._open.values()):
            grant.ticks += 1
            if grant.ticks < 2:
                continue
            try:
                await self._charge(grant, record)
            except StoreUnavailable as exc:
                self._store_failed("accounting", exc)
                return

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.charge_open()

    async def usage(self, start: float, end: float) -> dict[str, UsageTotals]:
        return await self._store.usage(start, end)

    async def aclose(self) -> None:
        """Settle what is still settling, then close the store."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self._store.aclose()

    def _store_failed(self, during: str, exc: BaseException) -> None:
        self._metrics.store_errors.inc()
        now = self._clock()
        if now - self._last_logged >= LOG_EVERY_S:
            self._last_logged = now
            policy = "admitting without limits (fail-open)" if self._fail_open else "refusing limited keys"
            logger.error("limit store unavailable during %s: %s; %s", during, exc, policy)
