"""Side-by-side gateway benchmark: direct to a fake engine vs specgate, LiteLLM proxy and vllm-router.

    flock /tmp/specgate-heavy.lock .venv/bin/python -m benchmarks.bench_gateways --phases latency --levels 1,100

Every gateway runs pinned to --gateway-cpu (one core each, alone there); the fake engine and this process (the
load generator) share --client-cpu. Phases (each starts its own engine and targets, and writes
<out-dir>/<phase>.json; the Markdown report and plots are rebuilt from all phase files present):

- latency: levels x interleaved rounds at GPU-like timing (--ttft-ms, --gap-ms, --output-len), the streams
  started spread over --ramp-up-s (default: one request's duration) and only requests sent after it measured,
  so each level is its concurrency in steady state;
- burst:   the same at --burst-levels with every stream started at once: equal requests then keep the streams
  in lockstep, and each round of requests reaches the target as one burst (the worst case for any gateway);
- chunks:  the same at --chunk-level with 4 tokens per event (speculative decoding), for the 1:1 check;
- capacity: gap --capacity-gap-ms, rising concurrency: highest events/s before TTFT p99 > 2x direct's;
- idle: --idle-streams streams held open by an engine that stalls them: RSS before / open / after.

Peers whose venv is missing (python -m benchmarks.peers install) are skipped with a note. A target
`specgate@DIR` runs the gateway of another checkout (`git worktree add DIR COMMIT`): before and after a change,
interleaved in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from benchmarks.bench_measure import host_steal, request_duration_s, say, steal_share_since
from benchmarks.bench_phases import CapacityPlan, LatencyPlan, capacity_phase, idle_phase, latency_phase
from benchmarks.bench_targets import Target, engine_timing_args, missing_peer, start_engine, start_target
from loadtest.procs import pin_self, raise_open_file_limit

PHASES = ("latency", "burst", "chunks", "capacity", "idle")
RESULTS = Path(__file__).parent / "results"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gateways", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="latency,burst,chunks,capacity,idle")
    p.add_argument("--targets", default="direct,specgate,litellm,vllm-router")
    p.add_argument("--levels", type=_ints, default=(1, 100, 300, 600), help="latency: concurrent streams")
    p.add_argument("--rounds", type=int, default=3, help="latency: interleaved rounds per level")
    p.add_argument("--requests-per-stream", type=int, default=LatencyPlan.requests_per_stream,
                   help="latency: requests per stream per round")
    p.add_argument("--min-requests", type=int, default=24, help="latency: at least this many per round")
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--gap-ms", type=float, default=10.0)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--ramp-up-s", type=float, default=None,
                   help="latency, chunks: spread stream starts over this long (default: one request's duration)")
    p.add_argument("--burst-levels", type=_ints, default=(100,), help="burst: concurrent streams, started at once")
    p.add_argument("--chunk-level", type=int, default=100, help="chunks: concurrency of the 4-token-per-event run")
    p.add_argument("--chunk-rounds", type=int, default=2)
    p.add_argument("--capacity-levels", type=_ints, default=(4, 8, 16, 32, 64, 128, 256))
    p.add_argument("--capacity-gap-ms", type=float, default=1.0)
    p.add_argument("--capacity-output-len", type=int, default=128)
    p.add_argument("--capacity-seconds", type=float, default=3.0, help="capacity: load time per target and level")
    p.add_argument("--idle-streams", type=int, default=1000)
    p.add_argument("--gateway-cpu", default="0", help="core for the gateway under test ('' = no pinning)")
    p.add_argument("--client-cpu", default="1", help="core for the engine and the load generator")
    p.add_argument("--out-dir", type=Path, default=RESULTS / "gateways", help="per-phase JSON and process logs")
    p.add_argument("--report", type=Path, default=RESULTS / "gateways.md")
    p.add_argument("--title", default="Side-by-side: direct vs specgate, LiteLLM proxy, vllm-router")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def engine_args(args: argparse.Namespace, phase: str) -> list[str]:
    base = engine_timing_args(args.ttft_ms, args.gap_ms, args.output_len)
    if phase == "chunks":
        return [*base, "--tokens-per-chunk", "4"]
    if phase == "capacity":
        return engine_timing_args(args.ttft_ms, args.capacity_gap_ms, args.capacity_output_len)
    if phase == "idle":
        # Every stream stalls after its role chunk and first token: open end to end, then silent.
        return [*base, "--fault", "stall=1.0", "--fault-after-events", "2", "--stall-s", "600"]
    return base


def ramp_up_s(args: argparse.Namespace) -> float:
    """Stagger streams over one request's duration, so their starts (and ends) spread evenly over time."""
    if args.ramp_up_s is not None:
        return float(args.ramp_up_s)
    return request_duration_s(args.ttft_ms, args.gap_ms, args.output_len)


async def _run(phase: str, args: argparse.Namespace, targets: Sequence[Target], engine: Target) -> list[Any]:
    progress = not args.no_progress
    if phase in ("latency", "burst", "chunks"):
        levels = {"latency": args.levels, "burst": args.burst_levels, "chunks": (args.chunk_level,)}[phase]
        rounds = args.chunk_rounds if phase == "chunks" else args.rounds
        plan = LatencyPlan(levels=levels, rounds=rounds, output_len=args.output_len,
                           requests_per_stream=args.requests_per_stream, min_requests=args.min_requests,
                           ramp_up_s=0.0 if phase == "burst" else ramp_up_s(args), progress=progress)
        return await latency_phase(targets, engine, plan)
    if phase == "capacity":
        cplan = CapacityPlan(levels=args.capacity_levels, seconds=args.capacity_seconds,
                             output_len=args.capacity_output_len, progress=progress)
        return await capacity_phase(targets, engine, cplan)
    return await idle_phase(targets, args.idle_streams)


def run_phase(phase: str, args: argparse.Namespace, command: str) -> dict[str, Any]:
    import uvloop

    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    skipped = [note for n in names if (note := missing_peer(n))]
    log_dir = args.out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    gateway_cpu, client_cpu = args.gateway_cpu or None, args.client_cpu or None
    started = time.time()
    steal_before = host_steal()
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(engine_args(args, phase), client_cpu, log_dir))
        targets = [Target("direct", engine.url, None, note="the fake engine itself")]
        for name in names:
            if name == "direct" or missing_peer(name):
                continue
            say(f"{phase}: starting {name}")
            targets.append(stack.enter_context(start_target(name, engine.url, gateway_cpu, log_dir)))
        if "direct" not in names:
            targets = targets[1:]
        say(f"{phase}: engine {' '.join(engine_args(args, phase))}; targets {', '.join(t.name for t in targets)}")
        rows = uvloop.run(_run(phase, args, targets, engine))
    data = {"phase": phase, "command": command, "host_steal": steal_share_since(steal_before),
            "started_at": started, "duration_s": time.time() - started,
            "engine_args": engine_args(args, phase), "targets": [t.name for t in targets],
            "notes": [t.note for t in targets if t.note and t.name != "direct"], "skipped": skipped,
            "gateway_cpu": gateway_cpu, "client_cpu": client_cpu, "load": _load_average(), "rows": rows,
            "ramp_up_s": ramp_up_s(args) if phase in ("latency", "chunks") else 0.0}
    path = args.out_dir / f"{phase}.json"
    if phase in ("latency", "burst", "chunks") and path.exists():
        data = _merge(orjson.loads(path.read_bytes()), data)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    return data


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Levels run separately (to keep each run short) go into one table: new rows replace old ones of the
    same level, and the commands of both runs are kept. Runs with other targets or timing start afresh."""
    if any(old.get(key) != new.get(key) for key in ("targets", "engine_args", "ramp_up_s")):
        return new
    levels = {row["level"] for row in new["rows"]}
    kept = [row for row in old["rows"] if row["level"] not in levels]
    if not kept:
        return new  # every level was measured again: the old run's commands no longer describe any row
    order = {name: i for i, name in enumerate(new["targets"])}
    rows = sorted([*kept, *new["rows"]], key=lambda r: (r["level"], order.get(r["target"], 99)))
    commands = [c for c in old.get("commands", [old["command"]]) if c != new["command"]]
    return {**new, "rows": rows, "commands": [*commands, new["command"]],
            "duration_s": old["duration_s"] + new["duration_s"], "runs": [*old.get("runs", [old["load"]]), new["load"]],
            "host_steals": [*old.get("host_steals", [old.get("host_steal")]), new.get("host_steal")]}


def _load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run(args: argparse.Namespace, command: str) -> list[Path]:
    """Every phase asked for, then the report rebuilt from all phase files in --out-dir."""
    for phase in [p.strip() for p in args.phases.split(",") if p.strip()]:
        say(f"phase {phase}")
        run_phase(phase, args, command)
    from benchmarks.bench_report import write_report

    return write_report(args.out_dir, args.report, title=args.title, plots=not args.no_plots)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = {p.strip() for p in args.phases.split(",") if p.strip()} - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; expected {', '.join(PHASES)}")
    raise_open_file_limit()
    pin_self(args.client_cpu)  # the load generator shares the engine's core
    gc.collect()
    gc.freeze()  # startup objects never make a collection pause a stream's timing
    paths = run(args, shlex.join(["python", "-m", "benchmarks.bench_gateways", *argv]))
    print(args.report.read_text())
    say("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
