"""Load generator data: what one request sends (RequestSpec) and what was measured for it (RequestResult)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Error kinds, one per way a request can fail; the summary counts them.
OK = "ok"
CONNECT = "connect"
RESET = "reset"
TIMEOUT = "timeout"
STREAM_ERROR = "stream_error"
NO_CONTENT = "no_content"
CANCELLED = "cancelled"
CLIENT = "client"


def http_kind(status: int) -> str:
    return f"http_{status}"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload: a prompt or messages, and how many tokens to ask for."""

    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    max_tokens: int | None = None
    session: str | None = None
    turn: int = 0
    # Trace replay: seconds after the run's start at which this request arrives.
    at: float | None = None


@dataclass(slots=True)
class RequestResult:
    """Client-side measurements of one request, with the definitions of `vllm bench serve`.

    ttft: send → first event whose `choices` is non-empty. itl: gaps between successive such events.
    latency (E2E): send → last data event (the usage-only one included; not [DONE]).
    tpot: (latency - ttft) / (output_tokens - 1).
    """

    index: int
    start_s: float = 0.0  # when it was sent, seconds after the run started
    queue_s: float = 0.0  # waiting on the client's concurrency limit before it was sent
    status: int | None = None
    kind: str = OK
    error: str = ""
    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    # Tokens carried by each event with choices (role chunk = 0), from continuous usage stats; empty if unknown.
    chunk_tokens: list[int] = field(default_factory=list)
    # True when output_tokens was counted from events because the server sent no usage.
    tokens_estimated: bool = False
    # Characters of generated text received: with a fake engine's fixed token text, the tokens delivered, as
    # counted by the client rather than reported by the server.
    content_chars: int = 0
    saw_done: bool = False
    session: str | None = None
    turn: int = 0
    # Sent while the streams were still starting (LoadConfig.ramp_up_s): delivered, but outside the summary.
    ramp_up: bool = False

    @property
    def ok(self) -> bool:
        return self.kind == OK

    @property
    def tpot_s(self) -> float | None:
        """vLLM bench's TPOT; None when it is undefined (failed, or a single output token)."""
        if not self.ok or self.ttft_s is None or self.latency_s is None or self.output_tokens <= 1:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tpot_s"] = self.tpot_s
        return data
