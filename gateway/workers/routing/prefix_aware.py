"""Prefix-aware: a prompt goes where its longest prefix was sent before, so vLLM's prefix cache hits."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from gateway.schemas import OpenAICall
from gateway.workers.pool import Worker
from gateway.workers.routing.least_loaded import LeastLoaded
from gateway.workers.routing.policy import LoadOf


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
