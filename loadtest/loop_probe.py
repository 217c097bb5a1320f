"""Event-loop lag and garbage-collector pauses inside the gateway, under a steady closed-loop load.

    python -m loadtest.loop_probe --concurrency 100 --seconds 10

Starts the fake engine (--client-cpu) and `specgate gateway` (--gateway-cpu) with a probe inside: a task that
sleeps --tick-ms and records how late it wakes (the wait any ready callback has in the loop's queue; each
hand-off between tasks on a request's path pays it once), and gc callbacks timing every collection. The load
(streams started spread over one request's duration) runs for --seconds; the probe reports per interval.
A measurement aid: the probe adds one timer per tick to the gateway's loop.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from loadtest.bench_measure import load_config, request_duration_s, say
from loadtest.bench_procs import pin_self, raise_open_file_limit
from loadtest.bench_targets import engine_timing_args, start_engine, start_instrumented_gateway
from loadtest.runner import run_scenario


class Probe:
    """Loop lag samples and collector pauses, written as one JSON line per interval."""

    def __init__(self, out: Path, tick_s: float, interval_s: float, garbage_types: bool = False) -> None:
        self.out, self.tick_s, self.interval_s = out, tick_s, interval_s
        self.garbage_types = garbage_types
        self.lags: list[float] = []
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.collected = {0: 0, 1: 0, 2: 0}
        self._gc_started = 0.0
        self._cpu_times = _cpu_times()

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._gc_started)
            self.collected[info["generation"]] += info["collected"]

    async def run(self) -> None:
        gc.callbacks.append(self.on_gc)
        if self.garbage_types:
            # Unreachable objects are kept in gc.garbage instead of freed, to be counted by type (a debugging aid:
            # the process then holds all its cyclic garbage).
            gc.set_debug(gc.DEBUG_SAVEALL)
        reported = time.perf_counter()
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            now = time.perf_counter()
            self.lags.append(now - before - self.tick_s)
            if now - reported >= self.interval_s:
                reported = now
                self._report()

    def _report(self) -> None:
        lags = sorted(self.lags)
        line: dict[str, Any] = {"ticks": len(lags), "lag_ms": {
            "mean": 1000 * sum(lags) / len(lags), "p50": 1000 * lags[len(lags) // 2],
            "p99": 1000 * lags[int(len(lags) * 0.99)], "max": 1000 * lags[-1]}}
        for generation, pauses in self.pauses.items():
            line[f"gen{generation}"] = {"count": len(pauses), "max_ms": 1000 * max(pauses, default=0.0),
                                        "sum_ms": 1000 * sum(pauses), "collected": self.collected[generation]}
            pauses.clear()
            self.collected[generation] = 0
        cpu_times = _cpu_times()
        # Whether a lag spike was the loop's own work, or time the process wanted its core and did not get it:
        # waiting behind another task on that core (run queue) or the VM's host running something else (steal).
        line["cpu_ms"] = {name: (cpu_times[name] - self._cpu_times[name]) / 1e6 for name in cpu_times}
        self._cpu_times = cpu_times
        if self.garbage_types:
            kinds = collections.Counter(type(obj).__qualname__ for obj in gc.garbage)
            line["garbage_types"] = dict(kinds.most_common(25))
            gc.garbage.clear()
        self.lags.clear()
        with self.out.open("ab") as sink:
            sink.write(orjson.dumps(line) + b"\n")


def _cpu_times() -> dict[str, int]:
    """Nanoseconds: this process on a CPU, runnable but waiting for one, and steal on the CPUs it may run on."""
    run_ns, wait_ns, _ = (int(field) for field in Path("/proc/self/schedstat").read_text().split())
    cpus = {f"cpu{cpu}" for cpu in os.sched_getaffinity(0)}
    ticks = 0
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] in cpus:
            ticks += int(fields[8])
    return {"run": run_ns, "run_queue": wait_ns, "steal": ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")}


def serve_with_probe(argv: Sequence[str], out: Path, tick_s: float, interval_s: float, fixes: Sequence[str],
                     garbage_types: bool) -> int:
    """`specgate gateway <argv>` with the probe started once the server is up (and gateway_variants fixes)."""
    from loadtest.gateway_variants import apply_fixes

    apply_fixes(fixes)
    from gateway import serve
    from gateway.cli import main as gateway_main

    probe = Probe(out, tick_s, interval_s, garbage_types)
    startup = serve.DrainingServer.startup
    tasks: set[asyncio.Task[None]] = set()

    async def startup_with_probe(self: serve.DrainingServer, sockets: Any = None) -> None:
        await startup(self, sockets)
        tasks.add(asyncio.get_running_loop().create_task(probe.run()))

    serve.DrainingServer.startup = startup_with_probe  # type: ignore[method-assign]
    return gateway_main(["gateway", *argv])


def summarise(out: Path) -> str:
    lines = [orjson.loads(raw) for raw in out.read_bytes().splitlines() if raw.strip()]
    rows = ["| interval | ticks | lag mean | lag p50 | lag p99 | lag max | on CPU | run queue | steal "
            "| gen0 n / max / sum / freed | gen1 n / max / sum / freed | gen2 n / max / sum / freed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for index, line in enumerate(lines, 1):
        lag = line["lag_ms"]
        gens = [f"{line[g]['count']} / {line[g]['max_ms']:.1f} / {line[g]['sum_ms']:.1f} / {line[g]['collected']}"
                for g in ("gen0", "gen1", "gen2")]
        cpu = line["cpu_ms"]
        rows.append(f"| {index} | {line['ticks']} | {lag['mean']:.2f} | {lag['p50']:.2f} | {lag['p99']:.2f} | "
                    f"{lag['max']:.2f} | {cpu['run']:.0f} | {cpu['run_queue']:.1f} | {cpu['steal']:.0f} | "
                    + " | ".join(gens) + " |")
    text = "\n".join(rows) + ("\n\n(ms; on CPU: the gateway's CPU time in the interval; run queue: time it was "
                              "runnable but another task had its core; steal: time the VM's host took from its core; "
                              "gen n / max / sum / freed: collections of that generation in the interval, "
                              "their longest and total pause, objects they found unreachable)\n")
    kinds: collections.Counter[str] = collections.Counter()
    for line in lines:
        kinds.update(line.get("garbage_types", {}))
    if kinds:
        text += "\nUnreachable objects by type, whole run:\n\n" + "\n".join(
            f"- {name}: {count:,}" for name, count in kinds.most_common(25)) + "\n"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m loadtest.loop_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--gap-ms", type=float, default=10.0)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--tick-ms", type=float, default=2.0)
    p.add_argument("--interval-s", type=float, default=2.0)
    p.add_argument("--gateway-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--garbage-types", action="store_true",
                   help="keep the collector's unreachable objects and count them by type (gc.DEBUG_SAVEALL)")
    p.add_argument("--fixes", default="", help="gateway_variants fixes to apply, e.g. gcdefault+cycles (an A/B)")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/specgate-loop-probe"))
    p.add_argument("--serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the gateway child
    args = p.parse_args(argv)
    out = args.out_dir / "probe.jsonl"
    if args.serve is not None:
        fixes = [fix for fix in args.fixes.split("+") if fix]
        return serve_with_probe(args.serve, out, args.tick_ms / 1000, args.interval_s, fixes, args.garbage_types)
    raise_open_file_limit()
    pin_self(args.client_cpu)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    engine_args = engine_timing_args(args.ttft_ms, args.gap_ms, args.output_len)
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(engine_args, args.client_cpu or None, args.out_dir))
        flags = ["--out-dir", str(args.out_dir), "--fixes", args.fixes, "--tick-ms", f"{args.tick_ms:g}",
                 "--interval-s", f"{args.interval_s:g}", *(["--garbage-types"] if args.garbage_types else [])]
        url = stack.enter_context(start_instrumented_gateway("loadtest.loop_probe", flags, engine.url,
                                                             args.gateway_cpu or None, args.out_dir,
                                                             {"SPECGATE_REQUEST_LOG": "false"}))
        ramp_up_s = request_duration_s(args.ttft_ms, args.gap_ms, args.output_len)
        config = load_config(url, args.concurrency, output_len=args.output_len, ramp_up_s=ramp_up_s,
                             duration_s=args.seconds, label="loop probe", progress=False)
        say(f"{args.concurrency} streams for {args.seconds:g} s through the probed gateway")
        result = asyncio.run(run_scenario(config))
    ttft = result.summary["ttft_ms"]
    print(f"load: {result.summary['event_throughput']:,.0f} events/s, TTFT p50 {ttft['p50']:.1f} ms, "
          f"p99 {ttft['p99']:.1f} ms\n")
    print(summarise(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
