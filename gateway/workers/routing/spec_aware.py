"""Speculation-aware: the worker on which a request starting now is expected to get the lowest time per output
token, learned online from this gateway's own requests (workers/serving_stats.py).

A speculating worker is faster while it is lightly loaded and slower once its batches fill; a plain one the other
way round. Nothing here knows that or any threshold: each worker's TPOT is measured at each load it runs at, and
each request goes where the measurements say it will be served fastest at the load it would find there. A
worker never measured is tried first, and a small share of requests goes to a random candidate, so that every
worker's figures stay current and none is starved.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.schemas import OpenAICall
from gateway.workers.pool import Worker
from gateway.workers.routing.least_loaded import LeastLoaded
from gateway.workers.routing.policy import LoadOf
from gateway.workers.serving_stats import ServingStats

EXPLORE_SHARE = 0.05


class SpecAware:
    """Lowest expected TPOT at the load the request would find; unmeasured workers first; 5 % explored."""

    name = "spec_aware"

    def __init__(self, load_of: LoadOf, stats: ServingStats, rng: random.Random | None = None) -> None:
        self._load_of = load_of
        self._stats = stats
        self._rng = rng or random.Random()
        self._fallback = LeastLoaded(load_of)

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        loads = {worker.url: self._load_of(worker) for worker in candidates}
        expected = {worker.url: self._stats.expected_tpot(call.model, worker.url, round(loads[worker.url]) + 1)
                    for worker in candidates}
        unmeasured = [worker for worker in candidates if expected[worker.url] is None]
        if unmeasured:
            return self._fallback.choose(unmeasured, call)
        if len(candidates) > 1 and self._rng.random() < EXPLORE_SHARE:
            return self._rng.choice(list(candidates))
        return min(candidates, key=lambda worker: (expected[worker.url], loads[worker.url]))

    def forget(self, worker_url: str) -> None:
        self._stats.forget(worker_url)
