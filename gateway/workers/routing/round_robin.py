"""Round robin: each worker in turn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from gateway.schemas import OpenAICall
from gateway.workers.pool import Worker
from gateway.workers.routing.policy import LoadOf


class RoundRobin:
    name = "round_robin"

    def __init__(self, load_of: LoadOf) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        return candidates[next(self._counter) % len(candidates)]

    def forget(self, worker_url: str) -> None:
        return None
