"""The side-by-side gateway benchmark at toy scale: direct + specgate processes, report and 1:1 delivery."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson

from benchmarks import bench_gateways
from benchmarks.bench_measure import TOKEN_TEXT, Run
from benchmarks.bench_report import added_by_round, one_to_one, round_table
from loadtest.procs import process_cpu_seconds
from loadtest.records import RequestResult


def test_tiny_benchmark_writes_report_and_delivers_one_to_one(tmp_path: Path) -> None:
    args = bench_gateways.build_parser().parse_args([
        "--phases", "latency,burst,chunks", "--targets", "direct,specgate", "--levels", "4", "--rounds", "1",
        "--burst-levels", "4",
        "--requests-per-stream", "2", "--min-requests", "8", "--output-len", "5", "--ttft-ms", "5", "--gap-ms", "1",
        "--chunk-level", "4", "--chunk-rounds", "1", "--gateway-cpu", "", "--client-cpu", "",
        "--no-plots", "--no-progress", "--out-dir", str(tmp_path / "out"), "--report", str(tmp_path / "report.md"),
    ])
    paths = bench_gateways.run(args, "python -m benchmarks.bench_gateways (test)")

    assert tmp_path / "report.md" in paths
    report = (tmp_path / "report.md").read_text()
    assert "## Latency at GPU-like timing" in report and "## 4 tokens per event" in report
    assert "| specgate | events and tokens 1:1 at 1 and 4 tokens per event |" in report
    assert "## Latency when every stream starts at once" in report
    # role + tokens: 1 + 5, or 1 + 1 + 4
    for phase, events_per_request in (("latency", 6), ("burst", 6), ("chunks", 3)):
        data = orjson.loads((tmp_path / "out" / f"{phase}.json").read_bytes())
        assert [row["target"] for row in data["rows"]] == ["direct", "specgate"]
        for row in data["rows"]:
            # Requests sent while the streams were still starting are delivered and checked, not measured.
            ramp_up = row["requests"]["ramp_up"]
            assert (ramp_up == 0) == (phase == "burst"), (phase, ramp_up)
            sent = 8 + ramp_up
            assert row["requests"]["completed"] == 8 and not row["errors"]
            assert row["client_events"] == row["engine_events"] == sent * events_per_request
            assert row["client_tokens"] == row["engine_tokens"] == sent * 5
            assert one_to_one(row) == "yes"
        specgate = data["rows"][1]
        assert specgate["rss_peak_mib"] > 0 and specgate["target_cpu_share"] > 0


def test_missing_peer_is_skipped_with_a_note(tmp_path: Path) -> None:
    from benchmarks import bench_targets, peers

    assert bench_targets.missing_peer("specgate", tmp_path) is None
    for name in peers.NAMES:
        note = bench_targets.missing_peer(name, tmp_path)
        assert note is not None and "skipped" in note and f"python -m benchmarks.peers install {name}" in note
    assert "api_base: http://127.0.0.1:9/v1" in peers.litellm_config("http://127.0.0.1:9/")


def _phase(command: str, levels: list[int]) -> dict[str, object]:
    return {"targets": ["direct", "specgate"], "engine_args": ["--gap-ms", "10"], "command": command,
            "rows": [{"level": level, "target": target} for level in levels for target in ("direct", "specgate")],
            "duration_s": 1.0, "load": {}}


def test_a_rerun_level_replaces_the_old_rows_and_commands_only_describe_kept_rows() -> None:
    merged = bench_gateways._merge(_phase("first", [1, 100]), _phase("second", [100]))
    assert [(row["level"], row["target"]) for row in merged["rows"]] == [
        (1, "direct"), (1, "specgate"), (100, "direct"), (100, "specgate")]
    assert merged["commands"] == ["first", "second"]
    rerun = bench_gateways._merge(_phase("first", [1, 100]), _phase("again", [1, 100]))
    assert rerun.get("commands", [rerun["command"]]) == ["again"]


def test_the_bare_relay_floor_delivers_every_event_and_token_it_is_sent(tmp_path: Path) -> None:
    args = bench_gateways.build_parser().parse_args([
        "--phases", "latency,chunks", "--targets", "direct,bare-relay", "--levels", "4", "--rounds", "1",
        "--requests-per-stream", "2", "--min-requests", "8", "--output-len", "5", "--ttft-ms", "5", "--gap-ms", "1",
        "--chunk-level", "4", "--chunk-rounds", "1", "--gateway-cpu", "", "--client-cpu", "",
        "--no-plots", "--no-progress", "--out-dir", str(tmp_path / "out"), "--report", str(tmp_path / "report.md"),
    ])
    bench_gateways.run(args, "python -m benchmarks.bench_gateways (test)")

    for phase in ("latency", "chunks"):
        rows = orjson.loads((tmp_path / "out" / f"{phase}.json").read_bytes())["rows"]
        bare = next(row for row in rows if row["target"] == "bare-relay")
        assert bare["requests"]["completed"] == 8 and not bare["errors"]
        assert bare["client_events"] == bare["engine_events"] > 0
        assert bare["client_tokens"] == bare["engine_tokens"] > 0


def test_process_cpu_time_resolves_less_than_a_clock_tick() -> None:
    # A short benchmark round costs a fast gateway a few ms of CPU; whole 10 ms ticks would read that as 0.
    before = process_cpu_seconds(os.getpid())
    spin_until = time.thread_time() + 0.003
    while time.thread_time() < spin_until:
        pass
    spent = process_cpu_seconds(os.getpid()) - before
    # Whole ticks would read 0 or 0.01.
    assert 0.0025 < spent < 0.009


def test_tokens_are_one_to_one_only_when_the_text_received_holds_them_all() -> None:
    # The engine reports 5 tokens in its usage whatever reached the client; one event's text was lost.
    def run_with(chars: int) -> dict[str, object]:
        record = RequestResult(index=0, ttft_s=0.01, itl_s=[0.01] * 5, output_tokens=5, latency_s=0.06,
                               content_chars=chars)
        return Run("relay", 1, records=[record], duration_s=1.0, engine_events=6, engine_tokens=5).row()

    whole, short = run_with(5 * len(TOKEN_TEXT)), run_with(4 * len(TOKEN_TEXT))
    assert whole["client_tokens"] == 5 and one_to_one(whole) == "yes"
    assert short["client_tokens"] == 4 and one_to_one(short) == "**no**"


def test_added_ttft_by_round_pairs_each_round_with_directs_and_one_disturbed_round_does_not_move_its_median(
) -> None:
    def row(target: str, p50s: list[float], p99s: list[float]) -> dict[str, object]:
        return {"target": target, "level": 100, "ttft_p50_by_round": p50s, "ttft_p99_by_round": p99s}

    direct = row("direct", [21.0, 22.0, 21.5], [25.0, 26.0, 30.0])
    # The host stalled the gateway's second round.
    gateway = row("specgate", [22.0, 40.0, 22.5], [27.0, 120.0, 31.0])
    assert added_by_round(gateway, direct, "p50") == [1.0, 18.0, 1.0]
    table = "\n".join(round_table([direct, gateway]))
    assert "| 100 | specgate | +1.00, +18.00, +1.00 | +1.00 | +2.0, +94.0, +1.0 | +2.0 |" in table
    # Rounds that do not pair up (a phase file from before per-round figures) give no row.
    assert added_by_round(row("specgate", [22.0], [27.0]), direct, "p50") == []
    assert round_table([direct, row("specgate", [], [])]) == []
