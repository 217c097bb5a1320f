"""Phases of the side-by-side gateway benchmark, each against one fake engine and the targets in front of it.

- latency: for each concurrency level, a warm-up, then `rounds` rounds with every target in turn (interleaved);
- capacity: rising concurrency at a tiny inter-token gap until a target's TTFT p99 passes 2x direct's;
- idle: many streams held open (the engine stalls them) to read each target's memory per open stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.bench_measure import Run, hold_streams, load_config, measure, say
from benchmarks.bench_targets import Target
from loadtest.runner import run_scenario


@dataclass(frozen=True)
class LatencyPlan:
    levels: tuple[int, ...]
    rounds: int
    output_len: int
    # Enough that a round is mostly steady state: at 2 per stream, the rounds at 100 streams lasted ~1.3 s,
    # and one disturbance in one of them moved a target's pooled p50 by 10 ms or more.
    requests_per_stream: int = 10
    min_requests: int = 24
    ramp_up_s: float = 0.0
    progress: bool = True

    def requests(self, level: int) -> int:
        return max(level * self.requests_per_stream, self.min_requests)


def _line(run: Run) -> str:
    row = run.row()
    ttft, tpot = row["ttft_ms"], row["tpot_ms"]
    errors = sum(row["errors"].values())
    return (f"{run.target:>24} c={run.level:<4} TTFT p50 {ttft['p50'] or 0:7.2f} p99 {ttft['p99'] or 0:7.2f} ms  "
            f"TPOT p50 {tpot['p50'] or 0:6.2f} ms  {row['event_throughput']:8.0f} ev/s  "
            f"events {row['client_events']}/{row['engine_events']:.0f}  errors {errors}  "
            f"cpu {row['target_cpu_share']:.0%}  rss {row['rss_peak_mib']:.0f} MiB")


async def warm_up(targets: Sequence[Target], level: int) -> None:
    """Open `level` connections on every hop with short requests, outside any measurement."""
    for target in targets:
        await run_scenario(load_config(target.url, level, output_len=4, num_requests=level, progress=False))


async def latency_phase(targets: Sequence[Target], engine: Target, plan: LatencyPlan) -> list[dict[str, Any]]:
    pooled: dict[tuple[str, int], Run] = {}
    for level in plan.levels:
        say(f"level {level}: warm-up")
        await warm_up(targets, level)
        for round_index in range(plan.rounds):
            for target in targets:
                label = f"{target.name} c={level} round {round_index + 1}/{plan.rounds}"
                config = load_config(target.url, level, output_len=plan.output_len,
                                     num_requests=plan.requests(level), ramp_up_s=plan.ramp_up_s, label=label,
                                     progress=plan.progress)
                run = await measure(target, engine, config)
                say(f"round {round_index + 1}: " + _line(run))
                pooled.setdefault((target.name, level), Run(target.name, level)).add(run)
    rows = [pooled[key].row() for key in sorted(pooled, key=lambda k: (k[1], _order(targets, k[0])))]
    for key in sorted(pooled, key=lambda k: (k[1], _order(targets, k[0]))):
        say("pooled: " + _line(pooled[key]))
    return rows


def _order(targets: Sequence[Target], name: str) -> int:
    return next(i for i, t in enumerate(targets) if t.name == name)


@dataclass(frozen=True)
class CapacityPlan:
    levels: tuple[int, ...]
    seconds: float
    output_len: int
    ttft_factor: float = 2.0
    progress: bool = True


async def capacity_phase(targets: Sequence[Target], engine: Target, plan: CapacityPlan) -> list[dict[str, Any]]:
    """Per level: direct, then each target still in the race; a target leaves after its first level whose TTFT
    p99 exceeds ttft_factor x direct's (or that had errors)."""
    direct = next(t for t in targets if t.name == "direct")
    racing = [t for t in targets if t.name != "direct"]
    rows: list[dict[str, Any]] = []
    for level in plan.levels:
        if not racing:
            break
        await warm_up([direct, *racing], level)
        direct_row: dict[str, Any] | None = None
        for target in [direct, *racing]:
            config = load_config(target.url, level, output_len=plan.output_len, duration_s=plan.seconds,
                                 label=f"capacity {target.name} c={level}", progress=plan.progress)
            run = await measure(target, engine, config)
            row = run.row()
            direct_row = direct_row or row
            limit = plan.ttft_factor * (direct_row["ttft_ms"]["p99"] or 0.0)
            row["ttft_limit_ms"] = limit
            row["within_limit"] = bool(target is direct or (
                (row["ttft_ms"]["p99"] or float("inf")) <= limit and not row["errors"]))
            rows.append(row)
            say(_line(run) + ("" if row["within_limit"] else f"  > {plan.ttft_factor:g}x direct TTFT p99"))
        racing = [t for t in racing if next(r for r in reversed(rows) if r["target"] == t.name)["within_limit"]]
    return rows


def capacity_verdicts(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target: the highest delivered events/s before its TTFT p99 first exceeded the limit."""
    best: dict[str, dict[str, Any]] = {}
    stopped: set[str] = set()
    for row in rows:
        name = row["target"]
        entry = best.setdefault(name, {"events_per_s": 0.0, "level": None, "stopped_at": None,
                                       "us_per_event": None})
        if name in stopped:
            continue
        if not row["within_limit"]:
            stopped.add(name)
            entry["stopped_at"] = row["level"]
            continue
        if row["event_throughput"] > entry["events_per_s"]:
            entry.update(events_per_s=row["event_throughput"], level=row["level"],
                         us_per_event=row["target_us_per_event"], cpu_share=row["target_cpu_share"])
    return best


async def idle_phase(targets: Sequence[Target], streams: int) -> list[dict[str, Any]]:
    rows = []
    for target in targets:
        if target.name == "direct":
            continue
        say(f"{target.name}: holding {streams} idle streams")
        result = await hold_streams(target.url, streams, pid=target.pid)
        opened = result["opened"] or 1
        result["per_stream_kib"] = ((result["open_mib"] or 0) - (result["before_mib"] or 0)) * 1024 / opened
        rows.append({"target": target.name, **result})
        say(f"{target.name}: {result}")
    return rows
