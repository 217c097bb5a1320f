"""Per-key usage in Prometheus: requests by status, prompt and output tokens, refusals by reason; the limit
store's failures; the keys file's reloads. The `key` label is the key's name from the keys file, never its
secret or hash."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.observability.record import RequestRecord


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("specgate_key_requests", "Requests admitted for a key, by final status.",
                                ["key", "status"], registry=registry)
        self.prompt_tokens = Counter("specgate_key_prompt_tokens", "Prompt tokens of a key's requests.", ["key"],
                                     registry=registry)
        self.output_tokens = Counter("specgate_key_output_tokens", "Output tokens of a key's requests.", ["key"],
                                     registry=registry)
        self.rate_limited = Counter(
            "specgate_key_rate_limited", "A key's requests refused with 429, by the limit they hit "
            "(requests, tokens, concurrency, daily_tokens, limits_unavailable).", ["key", "reason"], registry=registry)
        self.store_errors = Counter("specgate_limit_store_errors", "Calls to the limit store that failed.",
                                    registry=registry)
        self.reloads = Counter("specgate_keys_reloads", "Keys file reloads, by result (ok, failed).", ["result"],
                               registry=registry)
        self.reload_failing = Gauge(
            "specgate_keys_reload_failing", "1 while the keys file on disk cannot be loaded (the previous keys "
            "stay in force).", registry=registry)

    def finished(self, record: RequestRecord) -> None:
        self.requests.labels(record.key, record.status).inc()
        if record.prompt_tokens:
            self.prompt_tokens.labels(record.key).inc(record.prompt_tokens)
        if record.output_tokens:
            self.output_tokens.labels(record.key).inc(record.output_tokens)

    def refused(self, key: str, reason: str) -> None:
        self.rate_limited.labels(key, reason).inc()

    def reloaded(self, ok: bool, message: str) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()
        self.reload_failing.set(0 if ok else 1)
