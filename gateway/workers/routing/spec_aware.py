"""Speculation-aware: the worker where a request starting now adds the least time per output token to the pool,
learned online from this gateway's own requests (workers/serving_stats.py).

A speculating worker is faster while it is lightly loaded and slower once its batches fill; a plain one the other
way round. Nothing here knows that or any threshold: each worker's TPOT is measured at each load it runs at (its
TPOT curve), and each request goes where the curves say the pool's total TPOT grows least: at load L, a worker
with curve f costs (L+1) f(L+1) - L f(L), the new request's own TPOT plus what it adds to the L already there.
Alone, that is the fastest worker; as load rises, a worker whose TPOT climbs steeply stops being chosen before
its own requests alone would say so. A worker never measured is tried first, and a small share of requests goes
to a random candidate, so that every worker's figures stay current and none is starved.
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
    """Least added TPOT at the load the request would find; unmeasured workers first; 5 % explored."""

    name = "spec_aware"

    def __init__(self, load_of: LoadOf, stats: ServingStats, rng: random.Random | None = None) -> None:
        self._load_of = load_of
        self._stats = stats
        self._rng = rng or random.Random()
        self._fallback = LeastLoaded(load_of)

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        loads = {worker.url: self._load_of(worker) for worker in candidates}
        costs = {worker.url: self._added_tpot(call.model, worker.url, loads[worker.url]) for worker in candidates}
        unmeasured = [worker for worker in candidates if costs[worker.url] is None]
        if unmeasured:
            return self._fallback.choose(unmeasured, call)
        if len(candidates) > 1 and self._rng.random() < EXPLORE_SHARE:
            return self._rng.choice(list(candidates))
        return min(candidates, key=lambda worker: (costs[worker.url], loads[worker.url]))

    def _added_tpot(self, model: str, worker_url: str, load: float) -> float | None:
        with_it = self._stats.expected_tpot(model, worker_url, load + 1)
        if with_it is None:
            return None
        without = self._stats.expected_tpot(model, worker_url, load) if load > 0 else 0.0
        return (load + 1) * with_it - load * (without or 0.0)

    def forget(self, worker_url: str) -> None:
        self._stats.forget(worker_url)
