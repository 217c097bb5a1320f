"""Metric values computed from a scripted stream with known gaps and token counts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import CollectorRegistry, Histogram

from gateway.observability.metrics import TOKEN_GAP_BUCKETS, TOKENS_PER_CHUNK_BUCKETS, Metrics
from gateway.observability.record import RequestRecord
from gateway.streaming.stream import Stream
from gateway.streaming.usage import UsageFilter
from gateway.upstream.calls import OpenStream
from gateway.upstream.client import reader_of
from gateway.upstream.sse import Event, EventSplitter
from tests.unit.fakes import reply_of, vllm_stream

pytestmark = pytest.mark.anyio

LABELS = {"model": "demo", "worker": "w1"}


class ScriptedClock:
    """Returns the next scripted time on each call, so every stamp the relay takes is known."""

    def __init__(self, times: list[float]) -> None:
        self._times: Iterator[float] = iter(times)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return next(self._times)


async def _chunks(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {**LABELS, **labels})
    assert value is not None, f"{name} {labels} missing"
    return value


async def test_relay_stamps_ttft_per_token_and_per_chunk_gaps_from_usage() -> None:
    # Role chunk, then content events carrying 1, 3 and 2 tokens (3 and 2: speculative decoding).
    events = vllm_stream([1, 3, 2])
    first, rest = events[0], events[1:]
    # Clock reads: after the role chunk (no content), then for each later event its arrival and its
    # send, then the usage chunk's arrival (held back), [DONE]'s arrival and send, and the finish.
    times = [
        10.0,                  # role chunk sent (not content)
        10.05, 10.10,          # event 1 (1 token): arrived, sent -> first token at 10.10
        10.25, 10.40,          # event 2 (3 tokens): arrived, sent -> gap 0.30
        10.45, 10.60,          # event 3 (2 tokens): arrived, sent -> gap 0.20
        10.61,                 # usage-only chunk arrived (client did not ask: not sent)
        10.62, 10.63,          # [DONE] arrived, sent
        10.64,                 # finished
    ]
    clock = ScriptedClock(times)
    splitter = EventSplitter()
    read = reader_of(_chunks(rest))
    stream = OpenStream(
        reply=reply_of(read),
        splitter=splitter,
        first_events=[Event.parse(first.rstrip(b"\n"))],
        sent_at=9.9,
        first_event_at=9.95,
    )
    record = RequestRecord(request_id="r1", model="demo", endpoint="chat", stream=True, received_at=9.8)
    record.worker = "w1"
    metrics = Metrics()
    finished: list[RequestRecord] = []
    relay = Stream(stream, record, UsageFilter(False, False), clock, finished.append)
    sent = [chunk async for chunk in relay.events()]
    await relay.settle()
    metrics.record(finished[0])

    assert len(sent) == 5  # role + 3 content + [DONE]; usage-only chunk held back
    assert record.output_tokens == 6
    assert record.prompt_tokens == 5
    assert record.first_token_at == pytest.approx(10.10)
    assert _value(metrics, "specgate_time_to_first_token_seconds_sum") == pytest.approx(10.10 - 9.8)
    assert _value(metrics, "specgate_upstream_ttft_seconds_sum") == pytest.approx(10.05 - 9.9)
    # Per chunk: two gaps, 0.30 and 0.20.
    assert _value(metrics, "specgate_inter_chunk_seconds_count") == 2
    assert _value(metrics, "specgate_inter_chunk_seconds_sum") == pytest.approx(0.50)
    # Per token: 3 tokens at 0.10 and 2 tokens at 0.10.
    assert _value(metrics, "specgate_time_between_tokens_seconds_count") == 5
    assert _value(metrics, "specgate_time_between_tokens_seconds_sum") == pytest.approx(0.50)
    assert _value(metrics, "specgate_tokens_per_chunk_sum") == 6
    assert _value(metrics, "specgate_tokens_per_chunk_count") == 3
    # (6 - 1) tokens over 10.60 - 10.10 seconds.
    assert _value(metrics, "specgate_output_tokens_per_second_sum") == pytest.approx(5 / 0.5)
    assert _value(metrics, "specgate_e2e_seconds_sum", status="200") == pytest.approx(10.64 - 9.8)
    assert _value(metrics, "specgate_output_tokens_total") == 6
    assert _value(metrics, "specgate_requests_total", status="200") == 1


def test_record_without_tokens_observes_no_token_metrics() -> None:
    record = RequestRecord(request_id="r", model="demo", endpoint="chat", stream=True, received_at=1.0)
    record.worker = "w1"
    record.status = "502"
    record.finished_at = 1.5
    metrics = Metrics()
    metrics.record(record)
    assert metrics.registry.get_sample_value("specgate_time_to_first_token_seconds_count", LABELS) is None
    assert _value(metrics, "specgate_requests_total", status="502") == 1


def test_per_token_gaps_weight_each_token() -> None:
    record = RequestRecord(request_id="r", model="demo", endpoint="chat", stream=True, received_at=0.0)
    record.on_content(1.0, 1)
    record.on_content(1.4, 4)
    record.on_content(1.5, 1)
    assert record.token_gaps() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1])
    assert record.ttft_seconds == pytest.approx(1.0)


@pytest.mark.parametrize("tokens_each", [[1] * 40, [1, 3, 0, 2, 1, 1, 4, 0, 1] * 4],
                         ids=["one-token-events", "speculative-and-empty-events"])
def test_gap_histograms_hold_each_gap_in_its_bucket(tokens_each: list[int]) -> None:
    """Buckets, counts and sums of a stream's gaps, against prometheus_client's own histograms fed one value at
    a time: per event (inter-chunk), per token (the gap over the event's tokens, once per token) and per event's
    tokens; events that carried no token count as gaps between events only."""
    record = RequestRecord(request_id="r", model="demo", endpoint="chat", stream=True, received_at=0.0)
    record.worker = "w1"
    now = 0.02
    record.on_content(now, 1)
    for index, tokens in enumerate(tokens_each):
        now += (0.0005, 0.01, 0.0123, 0.04, 0.3)[index % 5]  # bounds and values between them
        record.on_content(now, tokens)
    metrics = Metrics()
    metrics.record(record)

    registry = CollectorRegistry()
    names = ("specgate_inter_chunk_seconds", "specgate_time_between_tokens_seconds", "specgate_tokens_per_chunk")
    per_chunk, per_token = (Histogram(name, "doc", buckets=TOKEN_GAP_BUCKETS, registry=registry) for name in names[:2])
    chunk_sizes = Histogram(names[2], "doc", buckets=TOKENS_PER_CHUNK_BUCKETS, registry=registry)
    chunk_sizes.observe(1)
    for gap, tokens in record.chunk_gaps:
        per_chunk.observe(gap)
        if tokens:
            chunk_sizes.observe(tokens)
            for _ in range(tokens):
                per_token.observe(gap / tokens)
    for name in names:
        bounds = TOKENS_PER_CHUNK_BUCKETS if name == names[2] else TOKEN_GAP_BUCKETS
        for bound in (*bounds, float("inf")):
            le = "+Inf" if bound == float("inf") else str(float(bound))
            expected = registry.get_sample_value(f"{name}_bucket", {"le": le})
            assert _value(metrics, f"{name}_bucket", le=le) == expected, (name, le)
        assert _value(metrics, f"{name}_count") == registry.get_sample_value(f"{name}_count")
        assert _value(metrics, f"{name}_sum") == pytest.approx(registry.get_sample_value(f"{name}_sum"))
