"""Chooses a worker by the model's routing policy; tries others before the first byte, within a retry budget."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from gateway.errors import (
    GatewayError,
    NoWorkerAvailable,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    WorkersBusy,
)
from gateway.observability.metrics import Metrics
from gateway.observability.record import RequestRecord
from gateway.schemas import OpenAICall
from gateway.workers.pool import Worker, WorkerPool
from gateway.workers.routing import RoutingPolicy, make_policy
from gateway.workers.serving_stats import ServingStats

T = TypeVar("T")

RETRYABLE = (UpstreamFailed, UpstreamTimeout, NoWorkerAvailable, WorkersBusy)


class Dispatcher:
    """Chooses a worker with the policy and moves the attempt to another one on a retryable failure."""

    def __init__(
        self,
        pool: WorkerPool,
        default_policy: str,
        policy_per_model: dict[str, str],
        metrics: Metrics,
        max_attempts: int,
        backoff_s: float,
        retry_after_s: int,
        serving: ServingStats,
    ) -> None:
        self._pool = pool
        self._serving = serving
        self._default_policy = default_policy
        self._policy_per_model = policy_per_model
        # Fail at start-up, not at the first request, on a misspelt policy name.
        for name in {default_policy, *policy_per_model.values()}:
            make_policy(name, pool.queue_depth, serving)
        self._policies: dict[str, RoutingPolicy] = {}
        pool.on_removed(self._forget)
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._retry_after_s = retry_after_s

    def policy_for(self, model: str) -> RoutingPolicy:
        policy = self._policies.get(model)
        if policy is None:
            name = self._policy_per_model.get(model, self._default_policy)
            policy = self._policies[model] = make_policy(name, self._pool.queue_depth, self._serving)
        return policy

    def _forget(self, worker_url: str) -> None:
        for policy in self._policies.values():
            policy.forget(worker_url)

    async def attempt(
        self, call: OpenAICall, record: RequestRecord, send: Callable[[Worker], Awaitable[T]],
        exclude: Sequence[Worker] = (),
    ) -> tuple[Worker, T]:
        """Run `send` on workers (not those in `exclude`) until one answers; the returned worker is counted as in
        flight."""
        tried: list[Worker] = []
        last_error: GatewayError | None = None
        while len(tried) < self._max_attempts:
            candidates = self._pool.candidates(call.model, exclude=[*exclude, *tried])
            if not candidates:
                break
            worker = self.policy_for(call.model).choose(candidates, call)
            if tried:
                self._metrics.upstream_retries.labels(call.model).inc()
                await asyncio.sleep(self._backoff_s * (0.5 + random.random()) * len(tried))
            tried.append(worker)
            record.attempts = len(tried)
            record.worker = worker.url
            self._pool.started(worker, record)
            record.worker_open_at_start = round(self._pool.queue_depth(worker))
            try:
                result = await send(worker)
            except UpstreamRejected:
                self._pool.finished(worker)
                self._pool.succeeded(worker)
                raise
            except WorkersBusy as exc:
                # Busy is load, not ill health: no strike towards ejection.
                self._pool.finished(worker)
                last_error = exc
                continue
            except RETRYABLE as exc:
                self._pool.finished(worker)
                self._pool.failed(worker)
                last_error = exc
                continue
            except BaseException:
                self._pool.finished(worker)
                raise
            self._pool.succeeded(worker)
            return worker, result
        if last_error is not None:
            if last_error.retry_after_s is None:
                last_error.retry_after_s = self._retry_after_s
            raise last_error
        raise NoWorkerAvailable(
            f"no healthy worker serves model '{call.model}' right now", retry_after_s=self._retry_after_s
        )
