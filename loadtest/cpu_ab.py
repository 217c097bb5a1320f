"""Interleaved A/B of two gateway checkouts: CPU per event (user and system) and TTFT under steady streams.

    git worktree add /tmp/gateway-old <older commit>
    flock /tmp/specgate-heavy.lock .venv/bin/python -m loadtest.cpu_ab --old /tmp/gateway-old --pairs 3

The VM's host takes CPU time from it at random, which moves latency figures between runs made minutes
apart; so each pair runs the old checkout's gateway, then this one's, on the same fake engine, and the table
shows every pair next to its host steal. Each gateway runs alone on --gateway-cpu; the engine and the load
generator share --client-cpu. Streams start spread over one request's duration, and only requests sent after
that are measured. CPU per event = the gateway's CPU time over the engine's events (with choices) in the run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench_measure import engine_counters, host_steal, load_config, request_duration_s, say, steal_share_since
from loadtest.bench_procs import pin_self, process_cpu_split, raise_open_file_limit
from loadtest.bench_targets import Target, engine_timing_args, start_engine, start_specgate
from loadtest.runner import run_scenario


@dataclass(frozen=True)
class Side:
    label: str
    user_us: float  # gateway CPU per event, user space
    system_us: float  # and in the kernel
    ttft_p50_ms: float
    ttft_p99_ms: float
    steal: float | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.cpu_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the other checkout (its gateway/ package is run)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--seconds", type=float, default=12.0, help="measured load time per run")
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--gap-ms", type=float, default=10.0)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--gateway-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--report", type=Path, help="write the Markdown table here as well")
    return p.parse_args(argv)


async def run_side(label: str, gateway: Target, engine: Target, args: argparse.Namespace) -> Side:
    assert gateway.pid is not None
    ramp_up = request_duration_s(args.ttft_ms, args.gap_ms, args.output_len)
    config = load_config(gateway.url, args.concurrency, output_len=args.output_len, num_requests=10**7,
                         duration_s=ramp_up + args.seconds, ramp_up_s=ramp_up, label=label, progress=False)
    events_before = engine_counters(engine.url)["events"]
    user_before, system_before = process_cpu_split(gateway.pid)
    steal_before = host_steal()
    result = await run_scenario(config)
    user_after, system_after = process_cpu_split(gateway.pid)
    events = max(engine_counters(engine.url)["events"] - events_before, 1.0)
    ttft = result.summary["ttft_ms"]
    return Side(label, 1e6 * (user_after - user_before) / events, 1e6 * (system_after - system_before) / events,
                ttft["p50"] or float("nan"), ttft["p99"] or float("nan"), steal_share_since(steal_before))


def render(pairs: list[tuple[Side, Side]], args: argparse.Namespace, argv: Sequence[str]) -> str:
    lines = [
        "```", f"python -m loadtest.cpu_ab {' '.join(argv)}", "```", "",
        f"{args.concurrency} steady streams; fake engine TTFT {args.ttft_ms:g} ms, gap {args.gap_ms:g} ms, "
        f"{args.output_len} tokens; {args.seconds:g} s measured per run.", "",
        "| pair | old µs/event user + system | new µs/event user + system | old / new TTFT p50 (ms) "
        "| old / new TTFT p99 (ms) | host steal old / new |",
        "|---|---|---|---|---|---|",
    ]

    def steal(side: Side) -> str:
        return "–" if side.steal is None else f"{100 * side.steal:.1f} %"

    for index, (old, new) in enumerate(pairs, 1):
        lines.append(f"| {index} | {old.user_us:.1f} + {old.system_us:.1f} | {new.user_us:.1f} + {new.system_us:.1f} "
                     f"| {old.ttft_p50_ms:.1f} / {new.ttft_p50_ms:.1f} | {old.ttft_p99_ms:.1f} / {new.ttft_p99_ms:.1f} "
                     f"| {steal(old)} / {steal(new)} |")
    old_total = statistics.mean(old.user_us + old.system_us for old, _ in pairs)
    new_total = statistics.mean(new.user_us + new.system_us for _, new in pairs)
    old_user = statistics.mean(old.user_us for old, _ in pairs)
    new_user = statistics.mean(new.user_us for _, new in pairs)
    lines.append(f"| mean | {old_user:.1f} user, {old_total:.1f} in all | {new_user:.1f} user, {new_total:.1f} in all "
                 f"({100 * (new_total / old_total - 1):+.0f} %) | | | |")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace, argv: Sequence[str]) -> str:
    log_dir = Path(tempfile.mkdtemp(prefix="specgate-cpu-ab-"))
    engine_args = engine_timing_args(args.ttft_ms, args.gap_ms, args.output_len)
    pairs: list[tuple[Side, Side]] = []
    with start_engine(engine_args, args.client_cpu, log_dir) as engine:
        for index in range(1, args.pairs + 1):
            sides = []
            for label, source in (("old", args.old.resolve()), ("new", None)):
                with start_specgate(engine.url, args.gateway_cpu, log_dir, source=source) as gateway:
                    side = await run_side(label, gateway, engine, args)
                say(f"pair {index} {label}: {side.user_us:.1f} + {side.system_us:.1f} µs/event, "
                    f"TTFT p50 {side.ttft_p50_ms:.1f} ms")
                sides.append(side)
            pairs.append((sides[0], sides[1]))
    return render(pairs, args, argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    raise_open_file_limit()
    pin_self(args.client_cpu)
    table = asyncio.run(main_async(args, argv))
    print(table)
    if args.report is not None:
        args.report.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
