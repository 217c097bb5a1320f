"""How the load generator measures: timings parsed from each stream, the summary's percentiles, goodput and rates."""

from __future__ import annotations

import pytest

from loadtest import generator
from loadtest.records import RequestResult
from loadtest.sse_client import _complete, _StreamState
from loadtest.summary import per_token_gaps, summarize


def test_stream_parser_handles_split_reads_comments_and_errors() -> None:
    record = RequestResult(index=0)
    state = _StreamState(record, start=0.0, chat=True, want_text=True)
    chunk = b'data: {"choices":[{"delta":{"content":"ab"}}],"usage":{"completion_tokens":2}}\r\n\r\n'
    stream = b": keep-alive\n\n" + chunk + chunk.replace(b'"ab"', b'"c"').replace(b":2}", b":3}")
    stream += b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3}}\n\ndata: [DONE]'
    for index in range(0, len(stream), 7):  # reads that cut events anywhere
        state.feed(stream[index:index + 7], now=index / 1000)
    state.finish(now=1.0)
    assert record.chunk_tokens == [2, 1] and record.output_tokens == 3 and record.prompt_tokens == 4
    assert record.saw_done and "".join(state.texts) == "abc" and len(record.itl_s) == 1

    failed = RequestResult(index=1)
    _StreamState(failed, 0.0, True, False).feed(b'data: {"error": {"message": "boom"}}\n\n', 0.1)
    assert failed.kind == "stream_error" and failed.error == "boom"


def _parsed(events: list[tuple[float, bytes]]) -> tuple[RequestResult, _StreamState]:
    record = RequestResult(index=0)
    state = _StreamState(record, start=0.0, chat=True, want_text=False)
    for now, event in events:
        state.feed(event + b"\n\n", now)
    _complete(record, state, 0.0)
    return record, state


def test_e2e_runs_to_the_usage_event_and_a_role_event_is_neither_a_token_nor_a_tbt_gap() -> None:
    def chunk(delta: str, tokens: int | None) -> bytes:
        usage = "" if tokens is None else f',"usage":{{"completion_tokens":{tokens}}}'
        return f'data: {{"choices":[{{"delta":{delta}}}]{usage}}}'.encode()

    usage_only = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3}}'
    record, _ = _parsed([
        (0.100, chunk('{"role":"assistant","content":""}', 0)), (0.101, chunk('{"content":"a"}', 1)),
        (0.141, chunk('{"content":"bc"}', 3)), (0.190, usage_only), (0.195, b"data: [DONE]"),
    ])
    # As vllm bench: E2E to the last data event, the usage-only one (not [DONE], not the last token).
    assert record.latency_s == pytest.approx(0.190)
    assert record.ttft_s == pytest.approx(0.100) and record.itl_s == pytest.approx([0.001, 0.040])
    # TBT starts at the first token: 40 ms over the 2 tokens of the later event, no 1 ms role-to-token gap.
    assert per_token_gaps(record) == pytest.approx([0.020, 0.020])

    no_usage, _ = _parsed([
        (0.1, chunk('{"role":"assistant","content":""}', None)), (0.2, chunk('{"content":"a"}', None)),
        (0.3, chunk('{"content":"bc"}', None)), (0.4, b"data: [DONE]"),
    ])
    assert no_usage.output_tokens == 2 and no_usage.tokens_estimated  # two events with text; the role has none


def test_summary_percentiles_and_goodput() -> None:
    records = []
    for index, (ttft, latency) in enumerate([(0.1, 1.1), (0.2, 1.2), (0.3, 2.3), (0.4, 4.4)]):
        record = RequestResult(index=index, ttft_s=ttft, latency_s=latency, output_tokens=11, itl_s=[0.1] * 10)
        records.append(record)
    records.append(RequestResult(index=4, kind="http_503"))
    summary = summarize(records, 2.0, slos_s={"ttft": 0.25, "tpot": 0.15}, percentiles=(50, 99))
    assert summary["ttft_ms"]["p50"] == pytest.approx(250.0)
    assert summary["ttft_ms"]["p99"] == pytest.approx(397.0)
    assert summary["tpot_ms"]["mean"] == pytest.approx((100 + 100 + 200 + 400) / 4)
    assert summary["goodput"]["good_requests"] == 2  # third fails TTFT, fourth fails both
    assert summary["goodput"]["request_goodput"] == pytest.approx(1.0)
    assert summary["errors"] == {"http_503": 1} and summary["request_throughput"] == pytest.approx(2.0)


def test_slo_parsing() -> None:
    for text, name, seconds in (("ttft=500ms", "ttft", 0.5), ("tpot:50", "tpot", 0.05), ("e2el=2s", "e2e", 2.0)):
        parsed_name, parsed_seconds = generator.parse_slo(text)
        assert parsed_name == name and parsed_seconds == pytest.approx(seconds)
    with pytest.raises(Exception, match="expected"):
        generator.parse_slo("itl=5ms")


def test_rates_after_a_ramp_up_count_what_arrived_in_the_window_from_every_request() -> None:
    # Window 1-3 s. The ramp-up request's last two events and its end fall inside it, so do all of the
    # second request and the first event of the third (which ends after the window).
    records = [
        RequestResult(index=0, ramp_up=True, start_s=0.0, ttft_s=0.5, itl_s=[1.0, 1.0], chunk_tokens=[0, 1, 1],
                      output_tokens=2, latency_s=2.5),
        RequestResult(index=1, start_s=1.2, ttft_s=0.3, itl_s=[0.5], chunk_tokens=[1, 1], output_tokens=2,
                      latency_s=0.8),
        RequestResult(index=2, start_s=2.5, ttft_s=0.2, itl_s=[0.5], chunk_tokens=[1, 1], output_tokens=2,
                      latency_s=0.7),
    ]
    summary = summarize(records, 2.0, rate_window_s=(1.0, 3.0), slos_s={"ttft": 0.4})
    assert summary["event_throughput"] == pytest.approx(5 / 2)
    assert summary["output_throughput"] == pytest.approx(5 / 2)
    assert summary["request_throughput"] == pytest.approx(2 / 2)
    assert summary["goodput"]["good_requests"] == 1  # of the two that ended in the window, one met the TTFT
    # Latencies stay over the measured requests only.
    assert summary["ttft_ms"]["count"] == 2 and summary["requests"]["ramp_up"] == 1
