"""Reads a worker's live load from its Prometheus text (vLLM metric names)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# vLLM metric name -> WorkerLoad field; counters are summed over their label sets.
SIGNALS: Mapping[str, str] = MappingProxyType({
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens_total": "accepted_tokens",
    "vllm:spec_decode_num_drafts_total": "drafts",
})
_PREFIXES = tuple(SIGNALS)


@dataclass
class WorkerLoad:
    """One scrape of a worker; `scraped_at` says how fresh it is."""

    scraped_at: float = float("-inf")
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    draft_tokens: float = 0.0
    accepted_tokens: float = 0.0
    drafts: float = 0.0

    def fresh(self, now: float, max_age_s: float) -> bool:
        return now - self.scraped_at <= max_age_s

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens per verification step: 1 (the target's own) + accepted drafts per draft."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else None

    @property
    def prefix_hit_rate(self) -> float | None:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else None


def parse_load(text: str, now: float) -> WorkerLoad:
    """Pick the load signals out of a /metrics page; lines of other metrics are skipped cheaply."""
    load = WorkerLoad(scraped_at=now)
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(_PREFIXES):
            continue
        brace = line.find("{")
        space = line.rfind(" ")
        name = line[:brace] if 0 < brace < space else line[: line.find(" ")]
        field = SIGNALS.get(name)
        if field is None:
            continue
        try:
            value = float(line[space + 1 :])
        except ValueError:
            continue
        totals[field] = totals.get(field, 0.0) + value
    for field, value in totals.items():
        setattr(load, field, value)
    return load
