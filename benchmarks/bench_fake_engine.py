"""Benchmark of the fake engine itself: SSE events/s it emits on one core to a direct client on the other.

    .venv/bin/python -m benchmarks.bench_fake_engine --gap-ms 10 --levels 100,300,600 --seconds 4

The engine runs pinned to --engine-cpu, `specgate loadtest` pinned to --client-cpu. For each concurrency level
the table shows the events/s delivered, both processes' CPU time per event and the engine's implied ceiling
(1 / its CPU time per event): the figure to compare with any gateway's events/s, which it must exceed.
A last row with --gap-ms 0 streams as fast as the engine can write.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench_measure import engine_counters
from loadtest.procs import children_cpu_seconds, free_port, pinned, process_cpu_seconds, wait_healthy


def measure(args: argparse.Namespace, gap_ms: float, concurrency: int, out_dir: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine_argv = [sys.executable, "-m", "loadtest.fake_engine", "--port", str(port), "--ttft-ms", str(args.ttft_ms),
                   "--gap-ms", str(gap_ms), "--output-len", str(args.output_len)]
    engine = subprocess.Popen(pinned(args.engine_cpu, engine_argv))
    try:
        wait_healthy(url)
        # Enough requests for about --seconds of streaming at the engine's nominal pace; flat out (gap 0) has
        # no pace, so it gets a fixed three rounds.
        per_request_s = (args.ttft_ms + gap_ms * (args.output_len - 1)) / 1000
        rounds = max(2, round(args.seconds / per_request_s)) if gap_ms > 0 else 3
        name = f"gap{gap_ms:g}-c{concurrency}"
        client_argv = [sys.executable, "-m", "loadtest.generator", "--base-url", url, "--endpoint", "completions",
                       "--input-len", "16", "--output-len", str(args.output_len), "--ignore-eos",
                       "--concurrency", str(concurrency), "--num-requests", str(concurrency * rounds),
                       "--no-progress", "--no-plots", "--output-dir", str(out_dir / name)]
        engine_before, client_before = process_cpu_seconds(engine.pid), children_cpu_seconds()
        events_before = engine_counters(url)["events"]
        subprocess.run(pinned(args.client_cpu, client_argv), check=True, stdout=subprocess.DEVNULL)
        engine_cpu, client_cpu = process_cpu_seconds(engine.pid) - engine_before, children_cpu_seconds() - client_before
        # Every event the engine wrote, failed and cancelled requests' too: its CPU went to all of them.
        engine_events = engine_counters(url)["events"] - events_before
    finally:
        engine.terminate()
        engine.wait(timeout=10)
    summary: dict[str, Any] = json.loads((out_dir / name / "summary.json").read_text())
    events = summary["event_throughput"] * summary["duration_s"]
    return {
        "gap_ms": gap_ms, "concurrency": concurrency,
        "offered_events_per_s": concurrency / (gap_ms / 1000) if gap_ms else None,
        "events_per_s": summary["event_throughput"], "events": events, "duration_s": summary["duration_s"],
        "engine_cpu_share": engine_cpu / summary["duration_s"],
        "engine_us_per_event": engine_cpu / engine_events * 1e6 if engine_events else None,
        # The client process also starts up and writes its report; that is inside its figure.
        "client_us_per_event": client_cpu / events * 1e6,
        "engine_ceiling_events_per_s": engine_events / engine_cpu if engine_cpu else None,
        "ttft_p50_ms": summary["ttft_ms"]["p50"], "itl_p50_ms": summary["itl_ms"]["p50"],
        "itl_p99_ms": summary["itl_ms"]["p99"], "errors": sum(summary["errors"].values()),
    }


def _cell(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fake_engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="100,300,600", help="concurrency levels")
    parser.add_argument("--gap-ms", type=float, default=10.0)
    parser.add_argument("--ttft-ms", type=float, default=5.0)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=4.0, help="rough streaming time per level")
    parser.add_argument("--flat-out-concurrency", type=int, default=100, help="streams for the gap-0 row (0 = skip)")
    parser.add_argument("--engine-cpu", default="0")
    parser.add_argument("--client-cpu", default="1")
    parser.add_argument("--result-dir", type=Path)
    args = parser.parse_args(argv)
    if not shutil.which("taskset"):
        print("taskset not found: processes will not be pinned", file=sys.stderr)
    out_dir = args.result_dir or Path("benchmarks/results") / time.strftime("fake-engine-capacity-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(args.gap_ms, int(level)) for level in args.levels.split(",")]
    if args.flat_out_concurrency:
        runs.append((0.0, args.flat_out_concurrency))
    rows = []
    for gap_ms, concurrency in runs:
        print(f"gap {gap_ms:g} ms, {concurrency} streams", file=sys.stderr, flush=True)
        rows.append(measure(args, gap_ms, concurrency, out_dir))
    command = " ".join(["python -m benchmarks.bench_fake_engine", *(argv if argv is not None else sys.argv[1:])])
    lines = ["# Fake engine capacity on one core", "", "```", command, "```", "",
             "| gap ms | streams | offered ev/s | delivered ev/s | engine CPU | engine µs/event | engine ceiling "
             "ev/s | client µs/event | TTFT p50 ms | ITL p50 ms | ITL p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join([
            _cell(row["gap_ms"], 0), str(row["concurrency"]), _cell(row["offered_events_per_s"], 0),
            _cell(row["events_per_s"], 0), f"{row['engine_cpu_share']:.0%}", _cell(row["engine_us_per_event"]),
            _cell(row["engine_ceiling_events_per_s"], 0), _cell(row["client_us_per_event"]),
            _cell(row["ttft_p50_ms"], 2), _cell(row["itl_p50_ms"], 2), _cell(row["itl_p99_ms"], 2),
            str(row["errors"])]) + " |")
    report = "\n".join(lines) + "\n"
    (out_dir / "capacity.md").write_text(report)
    (out_dir / "capacity.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
