"""Least loaded: the worker with the fewest open and waiting requests."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from gateway.schemas import OpenAICall
from gateway.workers.pool import Worker
from gateway.workers.routing.policy import LoadOf


class LeastLoaded:
    """Lowest queue depth (this gateway's open requests + the worker's waiting queue); ties round-robin."""

    name = "least_loaded"

    def __init__(self, load_of: LoadOf) -> None:
        self._load_of = load_of
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        loads = [self._load_of(worker) for worker in candidates]
        lowest = min(loads)
        tied = [worker for worker, load in zip(candidates, loads, strict=True) if load == lowest]
        return tied[next(self._counter) % len(tied)]

    def forget(self, worker_url: str) -> None:
        return None
