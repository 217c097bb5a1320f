"""The load generator against the fake engine: vllm bench metric definitions, arrivals, caps, ramp-up, workloads."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
from pathlib import Path

import pytest

from loadtest.fake_config import FakeEngineConfig, FaultConfig
from loadtest.fake_engine import FakeEngine, run_in_thread
from loadtest.records import RequestResult
from loadtest.runner import LoadConfig, RunResult, arrival_offsets, run_scenario
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


def test_warm_up_prompts_are_not_the_measured_ones() -> None:
    # Replayed, the measured prompts would find their prefill in vLLM's prefix cache and read a low TTFT.
    def first_requests(workload: RandomPrompts | SharedPrefixChat) -> list[str]:
        specs = [next(session) for session in itertools.islice(workload.sessions(), 3)]
        return [spec.prompt or str(spec.messages) for spec in specs]

    for workload in (RandomPrompts(input_len=32, seed=5), SharedPrefixChat(users=3, seed=5)):
        measured, warm_up = first_requests(workload), first_requests(workload.for_warm_up())
        assert not set(measured) & set(warm_up)
        assert first_requests(workload) == measured  # the measured run itself is unchanged
