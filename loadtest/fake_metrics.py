"""Fake engine bookkeeping: request counters and their Prometheus exposition under vLLM's metric names."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class EngineStats:
    """Counters of one fake engine instance; the event loop is their only writer."""

    running: int = 0
    waiting: int = 0
    # Prompt + generated tokens of running requests, for the KV-cache gauge.
    tokens_in_flight: int = 0
    requests_total: int = 0
    aborted_total: int = 0
    events_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_queries_total: int = 0
    prefix_hits_total: int = 0
    spec_drafts_total: int = 0
    spec_draft_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    faults_total: dict[str, int] = field(default_factory=dict)
    finished_total: dict[str, int] = field(default_factory=dict)

    def count_fault(self, kind: str) -> None:
        self.faults_total[kind] = self.faults_total.get(kind, 0) + 1

    def count_finished(self, reason: str) -> None:
        self.finished_total[reason] = self.finished_total.get(reason, 0) + 1


class PrefixCache:
    """A bounded memory of prompt prefixes seen, so shared-prefix loads show prefix-cache hits like vLLM's."""

    __slots__ = ("_capacity", "_seen")

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[int, None] = OrderedDict()

    def lookup(self, prefix_key: int) -> bool:
        """True when this prefix was seen before; remembers it either way."""
        if prefix_key in self._seen:
            self._seen.move_to_end(prefix_key)
            return True
        self._seen[prefix_key] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return False


def render_metrics(stats: EngineStats, *, model: str, kv_capacity_tokens: int, speculative: bool) -> bytes:
    """Prometheus text with vLLM's names and labels (model_name, engine); spec-decode series only when speculating."""
    labels = f'{{model_name="{model}",engine="0"}}'
    lines: list[str] = []

    def metric(name: str, kind: str, doc: str, value: float, suffix: str = "") -> None:
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{suffix}{labels} {float(value)}")

    metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", stats.running)
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", stats.waiting)
    usage = min(1.0, stats.tokens_in_flight / kv_capacity_tokens) if kv_capacity_tokens else 0.0
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage)
    metric("vllm:prefix_cache_queries", "counter", "Prefix cache queries, in terms of number of queried tokens.",
           stats.prefix_queries_total, "_total")
    metric("vllm:prefix_cache_hits", "counter", "Prefix cache hits, in terms of number of cached tokens.",
           stats.prefix_hits_total, "_total")
    metric("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.", stats.prompt_tokens_total, "_total")
    metric("vllm:generation_tokens", "counter", "Number of generation tokens processed.",
           stats.generation_tokens_total, "_total")
    if speculative:
        metric("vllm:spec_decode_num_drafts", "counter", "Number of spec decoding drafts.",
               stats.spec_drafts_total, "_total")
        metric("vllm:spec_decode_num_draft_tokens", "counter", "Number of draft tokens.",
               stats.spec_draft_tokens_total, "_total")
        metric("vllm:spec_decode_num_accepted_tokens", "counter", "Number of accepted tokens.",
               stats.spec_accepted_tokens_total, "_total")
    # Not a vLLM metric: the fake's own count of SSE events with choices, for 1:1 delivery checks.
    metric("fake_engine:sse_events", "counter", "SSE events with choices sent (role and token chunks).",
           stats.events_total, "_total")
    lines.append("# HELP vllm:request_success Count of successfully processed requests.")
    lines.append("# TYPE vllm:request_success counter")
    for reason in ("stop", "length", "abort"):
        count = stats.finished_total.get(reason, 0)
        lines.append(f'vllm:request_success_total{{model_name="{model}",engine="0",finished_reason="{reason}"}} '
                     f"{float(count)}")
    return ("\n".join(lines) + "\n").encode()
