"""Power of two choices: the less loaded of two workers drawn at random."""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.schemas import OpenAICall
from gateway.workers.pool import Worker
from gateway.workers.routing.policy import LoadOf


class PowerOfTwo:
    """Two random candidates, the less loaded wins: near least-loaded without herding on one worker."""

    name = "power_of_two"

    def __init__(self, load_of: LoadOf, rng: random.Random | None = None) -> None:
        self._load_of = load_of
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(list(candidates), 2)
        return first if self._load_of(first) <= self._load_of(second) else second

    def forget(self, worker_url: str) -> None:
        return None
