"""The load generator against the fake engine: vllm bench metric definitions, caps, scenarios, loopback guard."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
from pathlib import Path

import pytest

from loadtest import generator
from loadtest.fake_config import FakeEngineConfig, FaultConfig
from loadtest.fake_engine import FakeEngine, run_in_thread
from loadtest.records import RequestResult
from loadtest.runner import LoadConfig, RunResult, arrival_offsets, run_scenario
from loadtest.sse_client import _complete, _StreamState
from loadtest.summary import per_token_gaps, summarize
from loadtest.targets import TargetRefused, resolve_target
from loadtest.workloads import RandomPrompts, SharedPrefixChat, TraceReplay


def run(config: LoadConfig) -> RunResult:
    return asyncio.run(run_scenario(config))


def base(url: str, **overrides: object) -> LoadConfig:
    defaults: dict[str, object] = {"base_url": url, "progress": False,
                                   "workload": RandomPrompts(input_len=16, output_len=16)}
    return LoadConfig(**{**defaults, **overrides})  # type: ignore[arg-type]


def test_metrics_follow_vllm_bench_definitions() -> None:
    # The gap is wide so that TTFT measured to the first event (the role chunk, as vllm bench does) and
    # TTFT measured to the first content token (one gap later) stay apart on a loaded CI machine.
    ttft, gap, tokens = 0.040, 0.025, 16
    with run_in_thread(FakeEngineConfig(ttft_s=ttft, gap_s=gap)) as url:
        result = run(base(url, concurrency=2, num_requests=6, ignore_eos=True))
    assert [r.kind for r in result.records] == ["ok"] * 6
    for record in result.records:
        assert record.ttft_s is not None and record.latency_s is not None
        # Never less than the engine's TTFT (its millisecond timers may fire up to ~0.6 ms early).
        assert record.ttft_s > ttft - 0.001
        # Chat: the role chunk is the first event with choices, then 16 content events.
        assert len(record.itl_s) == tokens
        assert record.output_tokens == tokens and not record.tokens_estimated and record.saw_done
        assert record.chunk_tokens == [0] + [1] * tokens
        tpot = record.tpot_s
        assert tpot is not None
        assert abs(record.latency_s - (record.ttft_s + (tokens - 1) * tpot)) < 1e-9
    # A loaded VM stalls the whole process for tens of ms at a time (host steal), which only ever delays a
    # reading; so the earliest TTFT and the TPOT nearest the engine's gap must match its schedule. TTFT taken to
    # the first content token instead would put every reading a whole gap late.
    assert ttft - 0.001 < min(r.ttft_s or 0 for r in result.records) < ttft + gap / 2
    assert min(abs((r.tpot_s or 0) - gap) for r in result.records) < 0.001
    assert abs(statistics.median(g for r in result.records for g in r.itl_s[1:]) - gap) < 0.0015
    summary = result.summary
    assert summary["requests"] == {"total": 6, "completed": 6, "failed": 0, "cancelled": 0, "ramp_up": 0}
    assert summary["tpot_ms"]["mean"] == pytest.approx(1000 * statistics.mean(r.tpot_s or 0 for r in result.records))
    assert summary["total_output_tokens"] == 6 * tokens
    assert summary["output_throughput"] == pytest.approx(6 * tokens / result.duration_s)


def test_tokens_per_chunk_from_continuous_usage() -> None:
    with run_in_thread(FakeEngineConfig(ttft_s=0, gap_s=0.001, tokens_per_chunk=4)) as url:
        result = run(base(url, endpoint="completions", num_requests=2, ignore_eos=True))
    for record in result.records:
        assert record.chunk_tokens == [1, 4, 4, 4, 3]
        assert len(record.itl_s) == 4 and record.output_tokens == 16
    assert result.summary["tokens_per_chunk"]["mean"] == pytest.approx(16 / 5)
    assert result.summary["tokens_per_chunk"]["max"] == 4


def test_poisson_arrivals_respect_the_request_cap() -> None:
    with run_in_thread(FakeEngineConfig(ttft_s=0.001, gap_s=0.001)) as url:
        result = run(base(url, rate=300.0, num_requests=15))
    assert len(result.records) == 15
    starts = [r.start_s for r in result.records]
    assert starts == sorted(starts) and starts[-1] > 0.0
    assert all(r.ok for r in result.records)


def test_arrival_offsets_are_poisson_and_normalised_like_vllm_bench() -> None:
    offsets = list(arrival_offsets(rate=50.0, burstiness=1.0, seed=1, count=500))
    assert offsets == sorted(offsets) and offsets[-1] == pytest.approx(500 / 50.0)
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    # Exponential gaps: the standard deviation is about the mean (a constant rate would give ~0).
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.15)
    endless = arrival_offsets(rate=50.0, burstiness=1.0, seed=1, count=None)
    first_thousand = [next(endless) for _ in range(1000)]
    assert first_thousand[-1] / 1000 == pytest.approx(1 / 50.0, rel=0.1)
    bursty = list(arrival_offsets(rate=50.0, burstiness=0.25, seed=1, count=500))
    bursty_gaps = [b - a for a, b in zip([0.0, *bursty], bursty, strict=False)]
    assert statistics.stdev(bursty_gaps) / statistics.mean(bursty_gaps) > 1.5


def test_duration_cap_stops_issuing() -> None:
    with run_in_thread(FakeEngineConfig(ttft_s=0.001, gap_s=0.001)) as url:
        result = run(base(url, rate=100.0, num_requests=None, duration_s=0.3, drain_timeout_s=2))
    assert 5 <= len(result.records) <= 80
    assert max(r.start_s for r in result.records) < 0.3 + 0.02
    assert result.duration_s < 1.5


def test_ramp_up_spreads_stream_starts_and_leaves_its_requests_out_of_the_summary() -> None:
    # 4 streams over 0.2 s: starts at 0, 50, 100 and 150 ms; each request takes ~40 ms, so the early streams
    # send a few requests before the last one starts, and those are not measured.
    with run_in_thread(FakeEngineConfig(ttft_s=0.010, gap_s=0.002, output_len=16)) as url:
        result = run(base(url, concurrency=4, num_requests=12, ramp_up_s=0.2))
    ramp, measured = [r for r in result.records if r.ramp_up], [r for r in result.records if not r.ramp_up]
    assert len(measured) == 12, "the cap counts measured requests only"
    assert all(r.ok for r in result.records)
    first_starts = sorted(r.start_s for r in ramp)[:4]
    # Spread, not at once (the lower bound); the upper one leaves room for the host stalling the loop (a
    # 50 ms stall once put the second start at 100 ms).
    assert first_starts[0] < 0.02 and 0.04 < first_starts[1] < 0.15, first_starts
    assert all(r.start_s < 0.2 for r in ramp) and all(r.start_s >= 0.2 for r in measured)
    assert result.summary["requests"] == {"total": 12, "completed": 12, "failed": 0, "cancelled": 0,
                                          "ramp_up": len(ramp)}
    assert len(ramp) >= 4


def test_each_streams_first_request_is_part_of_the_ramp_up_even_when_it_leaves_after_it() -> None:
    # A ramp-up far shorter than a connect: every stream's first request leaves after its end.
    with run_in_thread(FakeEngineConfig(ttft_s=0.005, gap_s=0.001, output_len=4)) as url:
        result = run(base(url, concurrency=4, num_requests=8, ramp_up_s=1e-6))
    ramp = [r for r in result.records if r.ramp_up]
    assert len(ramp) == 4, [(r.start_s, r.ramp_up) for r in result.records]
    assert len(result.records) == 12 and result.summary["requests"]["ramp_up"] == 4


def test_duration_cap_cancels_stragglers() -> None:
    with run_in_thread(FakeEngineConfig(ttft_s=0.001, gap_s=0.05, output_len=1000)) as url:
        result = run(base(url, concurrency=2, num_requests=None, duration_s=0.1, drain_timeout_s=0.1))
    assert [r.kind for r in result.records] == ["cancelled", "cancelled"]
    assert result.summary["requests"]["cancelled"] == 2 and result.summary["requests"]["failed"] == 0


@pytest.mark.parametrize("url", ["http://8.8.8.8:8000", "http://10.1.2.3", "http://example.com", "http://0.0.0.0:80"])
def test_loopback_guard_refuses_other_hosts(url: str) -> None:
    with pytest.raises(TargetRefused):
        resolve_target(url, "chat")
    assert resolve_target(url, "completions", allow_remote=True)[0].endswith("/v1/completions")


def test_loopback_guard_accepts_loopback() -> None:
    for url in ("http://127.0.0.1:8000", "http://127.3.4.5", "http://localhost:1/v1", "http://[::1]:9"):
        full, is_chat = resolve_target(url, "chat")
        assert full.endswith("/v1/chat/completions") and "/v1/v1/" not in full and is_chat


def test_cli_refuses_public_target_before_sending(tmp_path: Path) -> None:
    code = generator.main(["--base-url", "http://93.184.216.34:80", "--no-progress", "--output-dir", str(tmp_path)])
    assert code == 2
    assert not (tmp_path / "summary.json").exists()


def test_errors_are_counted_by_kind() -> None:
    faults = FaultConfig.from_mapping({"503": 0.3, "reset": 0.2}, after_events=2)
    engine = FakeEngine(FakeEngineConfig(ttft_s=0, gap_s=0.001, output_len=8, faults=faults, seed=3))
    with run_in_thread(engine) as url:
        result = run(base(url, concurrency=4, num_requests=40))
    errors = result.summary["errors"]
    assert errors == {"http_503": engine.stats.faults_total["503"], "reset": engine.stats.faults_total["reset"]}
    assert result.summary["requests"]["completed"] == 40 - sum(errors.values())
    resets = [r for r in result.records if r.kind == "reset"]
    assert all(r.ttft_s is not None and len(r.itl_s) == 1 for r in resets)  # two events arrived, then the reset


def test_shared_prefix_chat_builds_histories_per_user() -> None:
    engine = FakeEngine(FakeEngineConfig(ttft_s=0, gap_s=0, output_len=3))
    workload = SharedPrefixChat(users=3, turns=2, system_tokens=100, user_tokens=5, output_len=3)
    with run_in_thread(engine) as url:
        result = run(base(url, concurrency=3, num_requests=100, workload=workload))
    assert len(result.records) == 6 and all(r.ok for r in result.records)
    by_user: dict[str, list[RequestResult]] = {}
    for record in result.records:
        assert record.session is not None
        by_user.setdefault(record.session, []).append(record)
    assert sorted(by_user) == ["user-0", "user-1", "user-2"]
    for turns in by_user.values():
        assert [r.turn for r in turns] == [0, 1]
        assert turns[1].start_s >= turns[0].start_s + (turns[0].latency_s or 0)
        assert (turns[1].prompt_tokens or 0) > (turns[0].prompt_tokens or 0)  # history grew
    # Cached: the system prompt (400 chars = 100 tokens + 4 template) for users 1 and 2 in turn 0, then each
    # user's whole turn-0 prompt (system + 20-char message: 105 + 8) in turn 1.
    assert engine.stats.prefix_hits_total == 2 * 104 + 3 * 113


def test_trace_replay_follows_timestamps(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    lines = [{"timestamp": 0.2, "prompt": "late", "max_tokens": 2},
             {"timestamp": 0.0, "messages": [{"role": "user", "content": "first"}], "max_tokens": 2},
             {"timestamp": 0.1, "prompt": "middle", "max_tokens": 3}]
    trace.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with run_in_thread(FakeEngineConfig(ttft_s=0, gap_s=0)) as url:
        result = run(base(url, workload=TraceReplay(trace)))
    starts = [r.start_s for r in result.records]
    assert [r.output_tokens for r in result.records] == [2, 3, 2]
    for start, offset in zip(starts, (0.0, 0.1, 0.2), strict=True):
        assert offset <= start < offset + 0.05


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


def test_warm_up_prompts_are_not_the_measured_ones() -> None:
    # Replayed, the measured prompts would find their prefill in vLLM's prefix cache and read a low TTFT.
    def first_requests(workload: RandomPrompts | SharedPrefixChat) -> list[str]:
        specs = [next(session) for session in itertools.islice(workload.sessions(), 3)]
        return [spec.prompt or str(spec.messages) for spec in specs]

    for workload in (RandomPrompts(input_len=32, seed=5), SharedPrefixChat(users=3, seed=5)):
        measured, warm_up = first_requests(workload), first_requests(workload.for_warm_up())
        assert not set(measured) & set(warm_up)
        assert first_requests(workload) == measured  # the measured run itself is unchanged


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
