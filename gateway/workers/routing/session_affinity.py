"""Session affinity: a session sticks to one worker by consistent hashing."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

from gateway.schemas import OpenAICall
from gateway.workers.pool import Worker
from gateway.workers.routing.least_loaded import LeastLoaded
from gateway.workers.routing.policy import LoadOf


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class SessionAffinity:
    """A session (x-session-id header, else the `user` field) sticks to one worker by consistent hashing,
    so a change in the pool moves only the sessions of the workers that came or went."""

    name = "session_affinity"
    VIRTUAL_NODES = 160

    def __init__(self, load_of: LoadOf) -> None:
        self._fallback = LeastLoaded(load_of)
        self._rings: dict[frozenset[str], tuple[list[int], list[str]]] = {}

    def _ring(self, urls: frozenset[str]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(urls)
        if ring is None:
            points = sorted((_hash64(f"{url}#{i}"), url) for url in urls for i in range(self.VIRTUAL_NODES))
            ring = ([point for point, _ in points], [url for _, url in points])
            if len(self._rings) > 64:  # pools change rarely; keep only recent shapes
                self._rings.clear()
            self._rings[urls] = ring
        return ring

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        if call.session_key is None:
            return self._fallback.choose(candidates, call)
        by_url = {worker.url: worker for worker in candidates}
        points, owners = self._ring(frozenset(by_url))
        index = bisect.bisect(points, _hash64(call.session_key)) % len(points)
        return by_url[owners[index]]

    def forget(self, worker_url: str) -> None:
        self._rings.clear()
