"""Benchmark: a high-priority key's TTFT while a low-priority key saturates the worker.

    flock /tmp/specgate-heavy.lock python -m benchmarks.bench_priority

The worker is the fake engine (a test double for a vLLM worker) running at most `--capacity` requests at once,
the rest waiting first come first served, with GPU-like timing (20 ms to first token, 10 ms per token, 50
tokens). A `low` key keeps `--overload` x capacity streams open; a `high` key sends one stream at a time. Set-ups,
in interleaved rounds: the high key alone (idle: the baseline); saturated with no admission cap (every request
goes to the worker and waits in its queue, whatever its key); saturated with the gateway's admission capped at
the worker's capacity (`max_concurrency`, the queue is the gateway's, ordered by class); and that with
`--reserve` slots only the high class may take (`high_priority_reserve`). Reported: the high key's TTFT p50 and
p99 and their ratio to idle, and the low key's output tokens/s (it must keep moving).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench_targets import start_engine
from benchmarks.bench_tenants import gateway, load, write_keys
from benchmarks.harness import RESULTS
from engine.launch import say
from loadtest.records import RequestResult
from loadtest.runner import run_scenario

HIGH, LOW = "sk-bench-high", "sk-bench-low"


async def drive(url: str, low_streams: int, duration_s: float, seed: int) -> tuple[list[RequestResult], float]:
    """The high key's requests and the low key's output tokens/s over the same `duration_s`."""
    high = run_scenario(load(url, HIGH, concurrency=1, duration_s=duration_s, ramp_up_s=2.0, seed=seed))
    runs = [high]
    if low_streams:
        runs.append(run_scenario(load(url, LOW, concurrency=low_streams, ramp_up_s=1.0, duration_s=duration_s + 3,
                                      seed=seed + 1000)))
    results = await asyncio.gather(*runs)
    low_rate = (sum(r.output_tokens for r in results[1].records) / results[1].duration_s) if low_streams else 0.0
    return [r for r in results[0].records if r.ok and not r.ramp_up], low_rate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--overload", type=int, default=4)
    parser.add_argument("--reserve", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "priority.md")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="specgate-priority-"))
    keys = write_keys(workdir / "keys.yaml", {HIGH: {"name": "high", "priority": "high"},
                                              LOW: {"name": "low", "priority": "low"}})
    base = {"SPECGATE_KEYS_FILE": str(keys)}
    capped = {**base, "SPECGATE_MAX_CONCURRENCY": str(args.capacity)}
    setups: dict[str, tuple[dict[str, str], int]] = {
        "idle (high key alone)": (base, 0),
        "saturated, no admission cap": (base, args.overload * args.capacity),
        "saturated, admission capped at capacity": (capped, args.overload * args.capacity),
        f"saturated, capped, {args.reserve} reserved for high": (
            {**capped, "SPECGATE_HIGH_PRIORITY_RESERVE": str(args.reserve)}, args.overload * args.capacity),
    }
    ttfts: dict[str, list[float]] = {name: [] for name in setups}
    low_rates: dict[str, list[float]] = {name: [] for name in setups}
    engine_args = ["--ttft-ms", "20", "--gap-ms", "10", "--output-len", "50", "--prompt-tokens", "50",
                   "--max-running", str(args.capacity)]
    with start_engine(engine_args, "1", workdir) as engine:
        for round_index in range(args.rounds):
            for name, (env, low_streams) in setups.items():
                url, process = gateway(engine.url, "0", workdir, env)
                with process:
                    say(f"round {round_index + 1}/{args.rounds}: {name}")
                    records, low_rate = asyncio.run(drive(url, low_streams, args.duration_s, round_index))
                ttfts[name] += [r.ttft_s * 1000 for r in records if r.ttft_s is not None]
                low_rates[name].append(low_rate)
    args.output.write_text(report(args, ttfts, low_rates))
    say(f"wrote {args.output}")
    print(args.output.read_text())
    return 0


def report(args: argparse.Namespace, ttfts: dict[str, list[float]], low_rates: dict[str, list[float]]) -> str:
    idle = statistics.median(next(iter(ttfts.values())))
    lines = ["# A high-priority key's TTFT while a low-priority key saturates the worker", "",
             f"Command: `{' '.join(['python -m benchmarks.bench_priority', *sys.argv[1:]])}`", "",
             f"Fake engine (a test double) running {args.capacity} requests at once, FIFO beyond; 20 ms TTFT, 10 ms "
             f"per token, 50 tokens. Low key: {args.overload * args.capacity} streams; high key: one at a time. "
             f"{args.rounds} interleaved rounds of {args.duration_s:g} s.", "",
             "| set-up | high requests | high TTFT p50 (ms) | p99 (ms) | p50 / idle | low key output tok/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, values in ttfts.items():
        p50 = statistics.median(values)
        p99 = statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else p50
        low: Any = f"{statistics.mean(low_rates[name]):.0f}" if any(low_rates[name]) else "–"
        lines.append(f"| {name} | {len(values)} | {p50:.1f} | {p99:.1f} | {p50 / idle:.2f} | {low} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
