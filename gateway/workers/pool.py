"""The worker pool: the workers, their health, live load, the models they serve, and passive ejection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.observability.metrics import Metrics
from gateway.observability.record import RequestRecord
from gateway.upstream.client import WorkerClient
from gateway.upstream.http1.errors import WorkerUnreachable
from gateway.workers.discovery import resolve
from gateway.workers.load import WorkerLoad, parse_load
from gateway.workers.warmup import warm_up
from gateway.workers.worker_view import worker_view

logger = logging.getLogger("specgate.pool")


@dataclass(frozen=True)
class PoolTiming:
    health_interval_s: float = 2.0
    health_timeout_s: float = 5.0
    scrape_interval_s: float = 0.25
    discovery_interval_s: float = 10.0
    eject_after_failures: int = 3
    # A busy worker can miss a health deadline; only a refused connection means it is gone at once.
    unhealthy_after_failures: int = 2
    eject_base_s: float = 1.0
    eject_max_s: float = 30.0
    # 0: no warm-up; else how long a coming-up worker's warm-up may take before it is tried again.
    warmup_timeout_s: float = 0.0

    @property
    def stale_after_s(self) -> float:
        """Load older than a few scrape periods is ignored rather than trusted."""
        return max(3 * self.scrape_interval_s, 1.0)


@dataclass(eq=False)
class Worker:
    """One vLLM worker as the gateway sees it."""

    url: str
    healthy: bool = False
    model_cards: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_flight: int = 0
    warming: asyncio.Task[bool] | None = None
    draining: bool = False  # out of routing on an operator's request (POST /admin/workers/drain)
    # The integral of `in_flight` over time up to `open_area_at`: a request's mean load over its life is the
    # difference of two readings divided by its duration (workers/serving_stats.py).
    open_area: float = 0.0
    open_area_at: float = 0.0
    consecutive_failures: int = 0
    health_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    load: WorkerLoad = field(default_factory=WorkerLoad)

    @property
    def models(self) -> frozenset[str]:
        return frozenset(self.model_cards)

    def available(self, now: float) -> bool:
        return self.healthy and not self.draining and now >= self.ejected_until

    def open_integral(self, now: float) -> float:
        return self.open_area + self.in_flight * (now - self.open_area_at)

    def count_open(self, now: float, change: int) -> None:
        self.open_area = self.open_integral(now)
        self.open_area_at = now
        self.in_flight += change

    def queue_depth(self, now: float, stale_after_s: float) -> float:
        """This gateway's open requests plus the worker's own waiting queue, when that is fresh."""
        waiting = self.load.waiting if self.load.fresh(now, stale_after_s) else 0.0
        return self.in_flight + waiting


class WorkerPool:
    """Keeps membership, health, models and load current; says which workers may take a request now."""

    def __init__(
        self,
        entries: Sequence[str],
        client: WorkerClient,
        metrics: Metrics,
        clock: Callable[[], float],
        timing: PoolTiming,
    ) -> None:
        self._entries = list(entries)
        self.workers: list[Worker] = []
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self.timing = timing
        self._on_removed: list[Callable[[str], None]] = []

    def on_removed(self, callback: Callable[[str], None]) -> None:
        self._on_removed.append(callback)

    async def discover(self) -> None:
        urls = await resolve(self._entries)
        known = {worker.url: worker for worker in self.workers}
        for url in urls:
            if url not in known:
                logger.info("worker %s joined", url)
        for url in set(known) - set(urls):
            logger.info("worker %s left", url)
            self._metrics.forget_worker(url)
            for callback in self._on_removed:
                callback(url)
        self.workers = [known.get(url) or Worker(url) for url in urls]

    async def refresh(self) -> None:
        await asyncio.gather(*(self._check(worker) for worker in self.workers))

    async def scrape(self) -> None:
        await asyncio.gather(*(self._scrape(worker) for worker in self.workers if worker.healthy))

    async def start(self) -> None:
        await self.discover()
        await self.refresh()
        await self.scrape()

    async def run(self) -> None:
        """Health checks, load scraping and re-discovery, each on its own period, until cancelled."""
        await asyncio.gather(
            _every(self.timing.health_interval_s, self.refresh),
            _every(self.timing.scrape_interval_s, self.scrape),
            _every(self.timing.discovery_interval_s, self.discover),
        )

    async def _check(self, worker: Worker) -> None:
        was_healthy = worker.healthy
        timeout = self.timing.health_timeout_s
        try:
            # A draining worker answers 503 here and so gets no new requests.
            health = await self._client.get(worker.url, "/health", timeout)
            if health.status == 200:
                listing = await self._client.get(worker.url, "/v1/models", timeout)
                if listing.status != 200:
                    raise ValueError(f"model list answered {listing.status}")
                worker.model_cards = {card["id"]: card for card in orjson.loads(listing.body).get("data", [])}
                for model in worker.model_cards:
                    self._metrics.prepare(model, worker.url)
                worker.health_failures = 0
                worker.healthy = worker.healthy or await self._warmed(worker)
            else:
                self._health_failed(worker, gone=health.status == 503)
        except WorkerUnreachable as exc:
            self._health_failed(worker, gone=True)
            logger.debug("health check of %s: %s", worker.url, exc)
        except (GatewayError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self._health_failed(worker, gone=False)
            logger.debug("health check of %s failed: %s", worker.url, exc)
        if worker.healthy != was_healthy:
            logger.info("worker %s is %s", worker.url, "healthy" if worker.healthy else "unhealthy")
        self._publish(worker)

    async def _warmed(self, worker: Worker) -> bool:
        """Whether a worker coming up has answered its warm-up; it runs in a task of its own so that it holds no
        other worker's health check, and the worker stays out of routing until a check finds it done."""
        if self.timing.warmup_timeout_s <= 0:
            return True
        if worker.warming is None:
            worker.warming = asyncio.create_task(
                warm_up(self._client, worker.url, list(worker.model_cards), self.timing.warmup_timeout_s))
            # The first check that starts it also waits a little: a fast warm-up is done in the same check.
            await asyncio.wait([worker.warming], timeout=min(self.timing.health_timeout_s, 1.0))
        if not worker.warming.done():
            return False
        warmed = worker.warming.result()
        worker.warming = None  # done: the next time it comes up, it is warmed again
        return warmed

    def _health_failed(self, worker: Worker, gone: bool) -> None:
        """Refused or draining: out at once. Slow or erroring: out after a few checks in a row."""
        worker.health_failures += 1
        if gone or worker.health_failures >= self.timing.unhealthy_after_failures:
            worker.healthy = False

    async def _scrape(self, worker: Worker) -> None:
        try:
            page = await self._client.get(worker.url, "/metrics", self.timing.health_timeout_s)
        except GatewayError:
            return  # the load goes stale and is then ignored; health checks decide availability
        if page.status != 200:
            return
        worker.load = parse_load(page.body.decode("utf-8", "replace"), self._clock())
        self._publish(worker)

    def _publish(self, worker: Worker) -> None:
        self._metrics.publish_worker(
            worker.url,
            available=worker.available(self._clock()),
            in_flight=worker.in_flight,
            load=worker.load,
        )

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

    def known_models(self) -> frozenset[str]:
        """Every model some worker has listed, healthy or not (routes may name a version that is restarting)."""
        return frozenset(model for worker in self.workers for model in worker.model_cards)

    def candidates(self, model: str, exclude: Sequence[Worker] = ()) -> list[Worker]:
        now = self._clock()
        serving = [w for w in self.workers
                   if model in w.model_cards and w.healthy and not w.draining and w not in exclude]
        available = [w for w in serving if now >= w.ejected_until]
        # Never eject the whole pool: when every server of the model is ejected, try them anyway.
        return available or serving

    def any_ready(self) -> bool:
        now = self._clock()
        return any(worker.available(now) for worker in self.workers)

    def queue_depth(self, worker: Worker) -> float:
        return worker.queue_depth(self._clock(), self.timing.stale_after_s)

    def started(self, worker: Worker, record: RequestRecord) -> None:
        """Count the request open on the worker and note where the worker's load integral stood."""
        now = self._clock()
        worker.count_open(now, +1)
        record.worker_started_at = now
        record.worker_open_area_at_start = worker.open_area
        self._metrics.child(self._metrics.worker_in_flight, worker.url).set(worker.in_flight)

    def finished(self, worker: Worker, record: RequestRecord | None = None) -> None:
        """Count it closed; with its record, note the mean load it ran at (open requests, time-weighted)."""
        now = self._clock()
        if record is not None and record.worker_started_at is not None and now > record.worker_started_at:
            elapsed = now - record.worker_started_at
            record.worker_mean_open = (worker.open_integral(now) - record.worker_open_area_at_start) / elapsed
        worker.count_open(now, -1)
        self._metrics.child(self._metrics.worker_in_flight, worker.url).set(worker.in_flight)

    def succeeded(self, worker: Worker) -> None:
        worker.consecutive_failures = 0
        worker.ejections = 0

    def failed(self, worker: Worker) -> None:
        """A connection or 5xx failure: after a few in a row, rest the worker with growing backoff."""
        worker.consecutive_failures += 1
        if worker.consecutive_failures >= self.timing.eject_after_failures:
            backoff = min(self.timing.eject_base_s * 2**worker.ejections, self.timing.eject_max_s)
            worker.ejections += 1
            worker.ejected_until = self._clock() + backoff
            worker.consecutive_failures = 0
            self._publish(worker)
            logger.warning("worker %s ejected for %.1fs", worker.url, backoff)

    def admin_view(self) -> list[dict[str, Any]]:
        return [worker_view(w, self._clock(), self.timing.stale_after_s) for w in self.workers]

    def drain(self, url: str, draining: bool) -> Worker | None:
        """Take a worker out of routing (its open requests go on) or put it back; None for an unknown worker."""
        worker = next((w for w in self.workers if w.url == url), None)
        if worker is not None and worker.draining != draining:
            worker.draining = draining
            logger.info("worker %s %s", url, "draining: no new requests" if draining else "back in routing")
            self._publish(worker)
        return worker


async def _every(interval_s: float, action: Callable[[], Any]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await action()
        except Exception:  # one bad round must not end the loop that keeps the pool current
            logger.exception("pool maintenance failed")
