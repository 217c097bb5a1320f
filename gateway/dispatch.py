"""Route+upstream stage: try workers in turn before the first byte, within a retry budget."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.errors import (
    GatewayError,
    NoWorkerAvailable,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
)
from gateway.metrics import Metrics, RequestRecord
from gateway.pool import Worker, WorkerPool
from gateway.protocol import OpenAICall
from gateway.routing import RoutingPolicy

T = TypeVar("T")

RETRYABLE = (UpstreamFailed, UpstreamTimeout, NoWorkerAvailable)


class Dispatcher:
    """Chooses a worker with the policy and moves the attempt to another one on a retryable failure."""

    def __init__(
        self,
        pool: WorkerPool,
        policy: RoutingPolicy,
        metrics: Metrics,
        max_attempts: int,
        backoff_s: float,
        retry_after_s: int,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._retry_after_s = retry_after_s

    async def attempt(
        self, call: OpenAICall, record: RequestRecord, send: Callable[[Worker], Awaitable[T]]
    ) -> tuple[Worker, T]:
        """Run `send` on workers until one answers; the returned worker is counted as in flight."""
        tried: list[Worker] = []
        last_error: GatewayError | None = None
        while len(tried) < self._max_attempts:
            candidates = self._pool.candidates(call.model, exclude=tried)
            if not candidates:
                break
            worker = self._policy.choose(candidates, call)
            if tried:
                self._metrics.upstream_retries.labels(call.model).inc()
                await asyncio.sleep(self._backoff_s * (0.5 + random.random()) * len(tried))
            tried.append(worker)
            record.attempts = len(tried)
            record.worker = worker.url
            self._pool.started(worker)
            try:
                result = await send(worker)
            except UpstreamRejected:
                self._pool.finished(worker)
                self._pool.succeeded(worker)
                raise
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
