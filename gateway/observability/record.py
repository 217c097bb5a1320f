"""What one request did (`RequestRecord`): its timestamps and counts, filled in along the request path and turned
into metrics and a log line once it ends (metrics.py)."""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field

DISCONNECTED_STATUS = "499"  # the status a request whose client left is counted under (nginx's)


@dataclass
class RequestRecord:
    """What one request did, as timestamps and counts; the Metrics object turns it into observations.

    Times are from one monotonic clock. `gap_seconds` and `gap_tokens` hold, for every content event after the
    first, the gap since the previous content event and the tokens it carried.
    """

    request_id: str
    model: str
    endpoint: str
    stream: bool
    received_at: float
    worker: str = "none"
    key: str = ""  # the API key's name (tenants/), "" without keys
    route: str | None = None  # the public route the client named (model_routes/), None for a served model
    served_model: str | None = None  # the version that served it
    shadow_of: str | None = None  # for a shadow copy: the request id of its primary
    greedy: bool = False
    output_sha256: str | None = None  # greedy requests with a shadow pair: to compare the two answers
    status: str = "200"
    # When it left the admission queue: admitted, refused (queue full or waited too long) or its client gone.
    queue_left_at: float | None = None
    upstream_sent_at: float | None = None
    upstream_first_token_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_chunk_tokens: int = 0
    # Typed arrays rather than a list of tuples: 12 bytes an event, however long the stream.
    gap_seconds: array[float] = field(default_factory=lambda: array("d"))
    gap_tokens: array[int] = field(default_factory=lambda: array("I"))
    attempts: int = 0
    migrations: int = 0  # times the stream went on from another worker after its worker failed mid-stream
    # The worker's queue depth when this request started on it, this request included (workers/serving_stats.py).
    worker_open_at_start: int = 0
    # This gateway's time-averaged open requests on the worker over the request's life, this one included: the
    # load it was actually served at, which a busy pool changes after it starts (workers/serving_stats.py).
    worker_mean_open: float = 0.0
    worker_started_at: float | None = None
    worker_open_area_at_start: float = 0.0
    disconnected: bool = False
    # Speculative decoding, from the worker's per-request report (observability/speculation.py); 0 without it.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_steps: int = 0

    def on_content(self, now: float, tokens: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
            self.first_chunk_tokens = tokens
        else:
            assert self.last_token_at is not None
            self.gap_seconds.append(now - self.last_token_at)
            self.gap_tokens.append(tokens)
        self.last_token_at = now

    @property
    def queue_seconds(self) -> float | None:
        return None if self.queue_left_at is None else self.queue_left_at - self.received_at

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.received_at

    @property
    def upstream_ttft_seconds(self) -> float | None:
        if self.upstream_first_token_at is None or self.upstream_sent_at is None:
            return None
        return self.upstream_first_token_at - self.upstream_sent_at

    @property
    def e2e_seconds(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.received_at

    @property
    def chunk_gaps(self) -> list[tuple[float, int]]:
        """(gap, tokens) per content event after the first."""
        return list(zip(self.gap_seconds, self.gap_tokens, strict=True))

    def token_gaps(self) -> list[float]:
        """Per output token: each content gap divided by the tokens of the later event."""
        gaps: list[float] = []
        for gap, tokens in self.chunk_gaps:
            if tokens > 0:
                gaps.extend([gap / tokens] * tokens)
        return gaps

    @property
    def output_tokens_per_second(self) -> float | None:
        if self.first_token_at is None or self.last_token_at is None or self.output_tokens < 2:
            return None
        span = self.last_token_at - self.first_token_at
        return None if span <= 0 else (self.output_tokens - 1) / span

    @property
    def spec_acceptance_rate(self) -> float | None:
        """Accepted draft tokens per drafted one, for a request its worker speculated on."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None

    @property
    def spec_mean_acceptance_length(self) -> float | None:
        """Tokens per verify step, the target's own token included (vLLM's mean acceptance length)."""
        return 1.0 + self.spec_accepted_tokens / self.spec_steps if self.spec_steps else None

    def log_fields(self) -> dict[str, object]:
        counted = [(gap, tokens) for gap, tokens in self.chunk_gaps if tokens > 0]
        gap_tokens = sum(tokens for _, tokens in counted)
        # The mean of the per-token gaps (each chunk's gap split over its tokens) is total gap / tokens.
        tbt_mean = sum(gap for gap, _ in counted) / gap_tokens if gap_tokens else None
        return {
            "time": round(time.time(), 3),
            "request_id": self.request_id,
            "model": self.model,
            "endpoint": self.endpoint,
            "worker": self.worker,
            "key": self.key or None,
            "route": self.route,
            "served_model": self.served_model,
            "status": self.status,
            "stream": self.stream,
            "attempts": self.attempts,
            "migrations": self.migrations,
            "worker_mean_open": _round(self.worker_mean_open or None),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "queue_s": _round(self.queue_seconds),
            "ttft_s": _round(self.ttft_seconds),
            "upstream_ttft_s": _round(self.upstream_ttft_seconds),
            "tbt_mean_s": _round(tbt_mean),
            "e2e_s": _round(self.e2e_seconds),
            "disconnected": self.disconnected,
            "spec_acceptance_rate": _round(self.spec_acceptance_rate),
            "spec_mean_acceptance_length": _round(self.spec_mean_acceptance_length),
            "shadow_of": self.shadow_of,
            "greedy": self.greedy,
            "output_sha256": self.output_sha256,
        }


def server_timing(record: RequestRecord) -> str:
    """The gateway's own timing of a whole (non-streaming) answer, as a `server-timing` header: the admission
    queue, the wait on workers, and the total, in milliseconds."""
    parts = []
    if record.queue_seconds is not None:
        parts.append(f"queue;dur={record.queue_seconds * 1000:.2f}")
    if record.queue_left_at is not None and record.finished_at is not None:
        parts.append(f"upstream;dur={(record.finished_at - record.queue_left_at) * 1000:.2f}")
    if record.e2e_seconds is not None:
        parts.append(f"total;dur={record.e2e_seconds * 1000:.2f}")
    return ", ".join(parts)


def token_count(value: object) -> int:
    """A token count from a worker's usage, or 0 when it is not one: a counter cannot go down, and a string or
    a negative number would fail the request's accounting."""
    return value if type(value) is int and value > 0 else 0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
