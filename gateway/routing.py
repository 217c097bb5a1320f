"""Route stage: policies that choose one worker from the candidates, behind one small Protocol."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

from gateway.pool import Worker
from gateway.protocol import OpenAICall


class RoutingPolicy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        """Pick one of a non-empty list of candidates."""
        ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        return candidates[next(self._counter) % len(candidates)]


class LeastLoaded:
    """Fewest requests this gateway has open on the worker; ties go round-robin."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        lowest = min(worker.in_flight for worker in candidates)
        tied = [worker for worker in candidates if worker.in_flight == lowest]
        return tied[next(self._counter) % len(tied)]


POLICIES: dict[str, type[RoundRobin] | type[LeastLoaded]] = {
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}") from None
