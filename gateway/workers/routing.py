"""Route stage: policies that choose one worker from the candidates, behind one small Protocol."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections import OrderedDict
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


class RoundRobin:
    name = "round_robin"

    def __init__(self, load_of: LoadOf) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        return candidates[next(self._counter) % len(candidates)]

    def forget(self, worker_url: str) -> None:
        return None


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


class PrefixIndex:
    """Per worker, an LRU set of prompt-block hashes; bounded in entries whatever the traffic."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        matched = 0
        for block in hashes:
            if block not in self._blocks:
                break
            matched += 1
        return matched

    def remember(self, hashes: Sequence[int]) -> None:
        for block in hashes:
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


def block_hashes(text: str, block_chars: int, max_blocks: int) -> list[int]:
    """Chained hashes of whole blocks: block i's hash stands for the whole prefix up to it."""
    hashes: list[int] = []
    previous = b""
    for start in range(0, min(len(text) // block_chars, max_blocks) * block_chars, block_chars):
        digest = hashlib.blake2b(previous + text[start : start + block_chars].encode(), digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "big"))
        previous = digest
    return hashes


class PrefixAware:
    """The worker that most likely holds this prompt's prefix in its KV cache, unless it is overloaded.

    Guarded by load: when the best match's queue exceeds the least-loaded worker's by more than
    `max_imbalance`, the request goes to the least-loaded one (and teaches its index), so a popular
    prefix cannot starve the other workers."""

    name = "prefix_aware"

    def __init__(
        self,
        load_of: LoadOf,
        block_chars: int = 256,
        max_blocks: int = 256,
        capacity_per_worker: int = 65536,
        max_imbalance: float = 4.0,
    ) -> None:
        self._load_of = load_of
        self._fallback = LeastLoaded(load_of)
        self._block_chars = block_chars
        self._max_blocks = max_blocks
        self._capacity = capacity_per_worker
        self._max_imbalance = max_imbalance
        self.indexes: dict[str, PrefixIndex] = {}

    def choose(self, candidates: Sequence[Worker], call: OpenAICall) -> Worker:
        hashes = block_hashes(call.prefix_text(), self._block_chars, self._max_blocks)
        least = self._fallback.choose(candidates, call)
        chosen = least
        if hashes:
            best_match, best = max(
                ((self._index(worker.url).matched_blocks(hashes), worker) for worker in candidates),
                key=lambda pair: (pair[0], -self._load_of(pair[1])),
            )
            if best_match and self._load_of(best) - self._load_of(least) <= self._max_imbalance:
                chosen = best
            self._index(chosen.url).remember(hashes)
        return chosen

    def _index(self, url: str) -> PrefixIndex:
        index = self.indexes.get(url)
        if index is None:
            index = self.indexes[url] = PrefixIndex(self._capacity)
        return index

    def forget(self, worker_url: str) -> None:
        self.indexes.pop(worker_url, None)


POLICIES: dict[str, Callable[[LoadOf], RoutingPolicy]] = {
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
    PowerOfTwo.name: PowerOfTwo,
    SessionAffinity.name: SessionAffinity,
    PrefixAware.name: PrefixAware,
}


def make_policy(name: str, load_of: LoadOf) -> RoutingPolicy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}") from None
    return factory(load_of)
