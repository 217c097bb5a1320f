"""What a routing policy is: it chooses one worker from the candidates for a call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.schemas import OpenAICall
from gateway.workers.pool import Worker

LoadOf = Callable[[Worker], float]


class RoutingPolicy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        """Pick one of a non-empty list of candidates."""
        ...

    def forget(self, worker_url: str) -> None:
        """The worker left the pool; drop what the policy keeps about it."""
        ...
