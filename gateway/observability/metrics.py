"""The gateway's Prometheus metrics: a Metrics object that owns its CollectorRegistry, turns each finished
request's record into observations and writes its log line, and keeps the per-worker gauges."""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import TypeVar

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from gateway.observability.histograms import BatchHistogram
from gateway.observability.record import RequestRecord
from gateway.workers.load import WorkerLoad

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
TOKEN_GAP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
THROUGHPUT_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)
TOKENS_PER_CHUNK_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 32)
ACCEPTANCE_RATE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
ACCEPTANCE_LENGTH_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 17.0)

request_logger = logging.getLogger("specgate.requests")

M = TypeVar("M", bound=MetricWrapperBase)


class Metrics:
    """The gateway's Prometheus metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}
        model_worker = ["model", "worker"]
        reg = self.registry
        self.ttft = Histogram(
            "specgate_time_to_first_token_seconds",
            "Request received to first content-bearing event sent to the client.",
            model_worker, buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.time_between_tokens = BatchHistogram(
            "specgate_time_between_tokens_seconds",
            "Per output token: gap between content events divided by the tokens in the later event.",
            model_worker, buckets=TOKEN_GAP_BUCKETS, registry=reg,
        )
        self.inter_chunk = BatchHistogram(
            "specgate_inter_chunk_seconds",
            "Gap between content events as the client sees them.",
            model_worker, buckets=TOKEN_GAP_BUCKETS, registry=reg,
        )
        self.tokens_per_chunk = BatchHistogram(
            "specgate_tokens_per_chunk",
            "Output tokens carried by one content event (above 1 with speculative decoding).",
            model_worker, buckets=TOKENS_PER_CHUNK_BUCKETS, registry=reg,
        )
        self.e2e = Histogram(
            "specgate_e2e_seconds", "Request received to last event sent.",
            [*model_worker, "status"], buckets=E2E_BUCKETS, registry=reg,
        )
        self.output_tokens_per_second = Histogram(
            "specgate_output_tokens_per_second",
            "Per request: (output tokens - 1) / (last token time - first token time).",
            model_worker, buckets=THROUGHPUT_BUCKETS, registry=reg,
        )
        self.spec_acceptance_rate = Histogram(
            "specgate_spec_acceptance_rate",
            "Per request its worker speculated on: accepted draft tokens / drafted tokens (vLLM's per-request report).",
            model_worker, buckets=ACCEPTANCE_RATE_BUCKETS, registry=reg,
        )
        self.spec_acceptance_length = Histogram(
            "specgate_spec_acceptance_length",
            "Per request its worker speculated on: tokens per verify step, the target's own included.",
            model_worker, buckets=ACCEPTANCE_LENGTH_BUCKETS, registry=reg,
        )
        self.spec_draft_tokens = Counter(
            "specgate_spec_draft_tokens", "Draft tokens proposed for this gateway's requests.", model_worker,
            registry=reg,
        )
        self.spec_accepted_tokens = Counter(
            "specgate_spec_accepted_tokens", "Draft tokens accepted for this gateway's requests.", model_worker,
            registry=reg,
        )
        self.upstream_ttft = Histogram(
            "specgate_upstream_ttft_seconds", "Upstream request sent to first content event from the worker.",
            model_worker, buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.queue = Histogram(
            "specgate_queue_seconds", "Time waiting for admission, admitted or not.", ["model"],
            buckets=QUEUE_BUCKETS, registry=reg,
        )
        self.requests = Counter(
            "specgate_requests", "Finished requests.", [*model_worker, "status"], registry=reg
        )
        self.prompt_tokens = Counter(
            "specgate_prompt_tokens", "Prompt tokens of finished requests.", model_worker, registry=reg
        )
        self.output_tokens = Counter(
            "specgate_output_tokens", "Output tokens of finished requests.", model_worker, registry=reg
        )
        self.client_disconnects = Counter(
            "specgate_client_disconnects", "Requests whose client went away before the end.",
            ["model"], registry=reg,
        )
        self.upstream_retries = Counter(
            "specgate_upstream_retries", "Attempts moved to another worker before the first byte.",
            ["model"], registry=reg,
        )
        self.stream_migrations = Counter(
            "specgate_stream_migrations", "Streams whose worker failed mid-stream, by what followed (resumed on "
            "another worker, no_worker to take it, not_resumable).", ["model", "outcome"], registry=reg,
        )
        self.in_flight = Gauge(
            "specgate_in_flight", "Requests admitted and not yet finished.", ["model"], registry=reg
        )
        self.queued = Gauge("specgate_queued", "Requests waiting for admission.", registry=reg)
        self.worker_healthy = Gauge(
            "specgate_worker_healthy", "1 when the worker answers /health and is not ejected.",
            ["worker"], registry=reg,
        )
        self.worker_in_flight = Gauge(
            "specgate_worker_in_flight", "Requests this gateway has open on the worker.",
            ["worker"], registry=reg,
        )
        self.worker_running = Gauge(
            "specgate_worker_running", "vllm:num_requests_running at the last scrape.", ["worker"], registry=reg
        )
        self.worker_waiting = Gauge(
            "specgate_worker_waiting", "vllm:num_requests_waiting at the last scrape.", ["worker"], registry=reg
        )
        self.worker_kv_cache_usage = Gauge(
            "specgate_worker_kv_cache_usage", "vllm:kv_cache_usage_perc (0-1) at the last scrape.",
            ["worker"], registry=reg,
        )
        self.worker_spec_acceptance_rate = Gauge(
            "specgate_worker_spec_acceptance_rate", "Accepted / drafted speculative tokens since the worker started.",
            ["worker"], registry=reg,
        )
        self.worker_prefix_cache_hit_rate = Gauge(
            "specgate_worker_prefix_cache_hit_rate", "Prefix-cache hit tokens / queried tokens since start.",
            ["worker"], registry=reg,
        )
        self._per_worker = (
            self.worker_healthy, self.worker_in_flight, self.worker_running, self.worker_waiting,
            self.worker_kv_cache_usage, self.worker_spec_acceptance_rate, self.worker_prefix_cache_hit_rate,
        )

    def prepare(self, model: str, worker: str) -> None:
        """Create a model/worker's series at zero before its first request, so that Prometheus's rate()
        sees the counters rise from 0 instead of appearing already at their first value."""
        for family in (
            self.ttft, self.time_between_tokens, self.inter_chunk, self.tokens_per_chunk,
            self.output_tokens_per_second, self.upstream_ttft, self.prompt_tokens, self.output_tokens,
        ):
            family.labels(model, worker)
        self.requests.labels(model, worker, "200")
        self.e2e.labels(model, worker, "200")
        for per_model in (self.queue, self.in_flight, self.client_disconnects, self.upstream_retries):
            per_model.labels(model)

    def publish_worker(self, url: str, *, available: bool, in_flight: int, load: WorkerLoad) -> None:
        self.worker_healthy.labels(url).set(1 if available else 0)
        self.worker_in_flight.labels(url).set(in_flight)
        self.worker_running.labels(url).set(load.running)
        self.worker_waiting.labels(url).set(load.waiting)
        self.worker_kv_cache_usage.labels(url).set(load.kv_cache_usage)
        if load.acceptance_rate is not None:
            self.worker_spec_acceptance_rate.labels(url).set(load.acceptance_rate)
        if load.prefix_hit_rate is not None:
            self.worker_prefix_cache_hit_rate.labels(url).set(load.prefix_hit_rate)

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, looked up once: prometheus_client validates the labels and takes a lock on
        every call, and a request makes a dozen (docs/design/performance.md, "Worker calls without httpx's
        request objects")."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found  # type: ignore[return-value]  # the cache keeps each metric's own child type

    def forget_worker(self, url: str) -> None:
        """A worker that left the pool stops being reported."""
        for gauge in self._per_worker:
            with contextlib.suppress(KeyError):
                gauge.remove(url)
        for key in [key for key in self._children if url in key[1]]:
            del self._children[key]

    def record(self, record: RequestRecord) -> None:
        """Observe one finished request; called once, when its last byte went out or it failed."""
        labels = (record.model, record.worker)
        child = self.child
        child(self.requests, *labels, record.status).inc()
        if record.e2e_seconds is not None:
            child(self.e2e, *labels, record.status).observe(record.e2e_seconds)
        if record.queue_seconds is not None:
            child(self.queue, record.model).observe(record.queue_seconds)
        if record.disconnected:
            child(self.client_disconnects, record.model).inc()
        if record.prompt_tokens:
            child(self.prompt_tokens, *labels).inc(record.prompt_tokens)
        if record.output_tokens:
            child(self.output_tokens, *labels).inc(record.output_tokens)
        if record.ttft_seconds is not None:
            child(self.ttft, *labels).observe(record.ttft_seconds)
        if record.upstream_ttft_seconds is not None:
            child(self.upstream_ttft, *labels).observe(record.upstream_ttft_seconds)
        if record.first_token_at is not None:
            self._observe_gaps(record, labels)
        if record.output_tokens_per_second is not None:
            child(self.output_tokens_per_second, *labels).observe(record.output_tokens_per_second)
        if record.spec_steps:
            self._observe_speculation(record, labels)

    def _observe_speculation(self, record: RequestRecord, labels: tuple[str, str]) -> None:
        child = self.child
        child(self.spec_draft_tokens, *labels).inc(record.spec_draft_tokens)
        child(self.spec_accepted_tokens, *labels).inc(record.spec_accepted_tokens)
        if record.spec_acceptance_rate is not None:
            child(self.spec_acceptance_rate, *labels).observe(record.spec_acceptance_rate)
        if record.spec_mean_acceptance_length is not None:
            child(self.spec_acceptance_length, *labels).observe(record.spec_mean_acceptance_length)

    def _observe_gaps(self, record: RequestRecord, labels: tuple[str, str]) -> None:
        per_chunk = self.inter_chunk.labels(*labels)
        per_token = self.time_between_tokens.labels(*labels)
        chunk_sizes = self.tokens_per_chunk.labels(*labels)
        if record.first_chunk_tokens > 0:
            chunk_sizes.observe(record.first_chunk_tokens)
        gaps, tokens_each = record.gap_seconds, record.gap_tokens
        if not gaps:
            return
        per_chunk.observe_each(gaps)
        sizes = collections.Counter(tokens_each)
        if sizes.get(1) == len(tokens_each):
            per_token.observe_each(gaps)  # one token per event (no speculation): each gap is a token's gap
        else:
            for gap, tokens in zip(gaps, tokens_each, strict=True):
                if tokens > 0:
                    per_token.observe(gap / tokens, tokens)
        for tokens, times in sizes.items():
            if tokens > 0:
                chunk_sizes.observe(tokens, times)

    def log(self, record: RequestRecord) -> None:
        if request_logger.isEnabledFor(logging.INFO):
            request_logger.info(orjson.dumps(record.log_fields()).decode())

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
