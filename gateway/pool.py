"""Pool stage: the workers, their health, the models they serve, and passive ejection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway.metrics import Metrics

logger = logging.getLogger("specgate.pool")

EJECT_AFTER_FAILURES = 3
EJECT_BASE_S = 1.0
EJECT_MAX_S = 30.0


@dataclass
class Worker:
    """One vLLM worker as the gateway sees it."""

    url: str
    healthy: bool = False
    model_cards: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_flight: int = 0
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0

    @property
    def models(self) -> frozenset[str]:
        return frozenset(self.model_cards)

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until


class WorkerPool:
    """Keeps the workers' health and models current; knows which workers may take a request now."""

    def __init__(
        self,
        urls: Sequence[str],
        client: httpx.AsyncClient,
        metrics: Metrics,
        clock: Callable[[], float],
        health_timeout_s: float,
    ) -> None:
        self.workers = [Worker(url) for url in urls]
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self._health_timeout_s = health_timeout_s

    async def refresh(self) -> None:
        await asyncio.gather(*(self._check(worker) for worker in self.workers))

    async def run(self, interval_s: float) -> None:
        """Active health checks until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh()

    async def _check(self, worker: Worker) -> None:
        was_healthy = worker.healthy
        try:
            health = await self._client.get(worker.url + "/health", timeout=self._health_timeout_s)
            worker.healthy = health.status_code == 200
            if worker.healthy:
                listing = await self._client.get(worker.url + "/v1/models", timeout=self._health_timeout_s)
                listing.raise_for_status()
                worker.model_cards = {card["id"]: card for card in listing.json().get("data", [])}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            worker.healthy = False
            logger.debug("health check of %s failed: %s", worker.url, exc)
        if worker.healthy != was_healthy:
            logger.info("worker %s is %s", worker.url, "healthy" if worker.healthy else "unhealthy")
        self._metrics.worker_healthy.labels(worker.url).set(1 if worker.available(self._clock()) else 0)

    def models(self) -> dict[str, dict[str, Any]]:
        """Model id -> the card a worker gave for it (first healthy worker wins)."""
        cards: dict[str, dict[str, Any]] = {}
        for worker in self.workers:
            if worker.healthy:
                for model_id, card in worker.model_cards.items():
                    cards.setdefault(model_id, card)
        return cards

    def knows_model(self, model: str) -> bool:
        return any(model in worker.model_cards for worker in self.workers)

    def candidates(self, model: str, exclude: Sequence[Worker] = ()) -> list[Worker]:
        now = self._clock()
        serving = [w for w in self.workers if model in w.model_cards and w.healthy and w not in exclude]
        available = [w for w in serving if now >= w.ejected_until]
        # Never eject the whole pool: when every server of the model is ejected, try them anyway.
        return available or serving

    def any_ready(self) -> bool:
        now = self._clock()
        return any(worker.available(now) for worker in self.workers)

    def started(self, worker: Worker) -> None:
        worker.in_flight += 1
        self._metrics.worker_in_flight.labels(worker.url).set(worker.in_flight)

    def finished(self, worker: Worker) -> None:
        worker.in_flight -= 1
        self._metrics.worker_in_flight.labels(worker.url).set(worker.in_flight)

    def succeeded(self, worker: Worker) -> None:
        worker.consecutive_failures = 0

    def failed(self, worker: Worker) -> None:
        """A connection or 5xx failure: after a few in a row, rest the worker with growing backoff."""
        worker.consecutive_failures += 1
        if worker.consecutive_failures >= EJECT_AFTER_FAILURES:
            backoff = min(EJECT_BASE_S * 2**worker.ejections, EJECT_MAX_S)
            worker.ejections += 1
            worker.ejected_until = self._clock() + backoff
            worker.consecutive_failures = 0
            self._metrics.worker_healthy.labels(worker.url).set(0)
            logger.warning("worker %s ejected for %.1fs", worker.url, backoff)

    def admin_view(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [
            {
                "url": w.url,
                "healthy": w.healthy,
                "available": w.available(now),
                "models": sorted(w.models),
                "in_flight": w.in_flight,
                "consecutive_failures": w.consecutive_failures,
                "ejected_for_s": max(0.0, round(w.ejected_until - now, 3)),
            }
            for w in self.workers
        ]
