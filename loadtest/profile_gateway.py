"""Profile specgate's hot path under streaming load with py-spy, and summarise where its CPU goes.

    flock /tmp/specgate-heavy.lock .venv/bin/python -m loadtest.profile_gateway --concurrency 300 --gap-ms 2

The fake engine and the load generator run on --client-cpu, the gateway alone on --gateway-cpu; py-spy samples
the gateway (non-blocking, from the client core) for --seconds while the load runs. The summary groups the
samples by the file of the leaf frame (self time: where the CPU goes) and by the files on the stack (inclusive
time), and lists the hottest functions. Needs `pip install py-spy` in the venv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from loadtest.bench_measure import load_config, request_duration_s, say
from loadtest.bench_procs import pin_self, pinned, raise_open_file_limit
from loadtest.bench_targets import engine_timing_args, start_engine, start_target
from loadtest.runner import run_scenario

# First match wins; matched against the frame's file path.
CATEGORIES = (
    ("gateway/relay.py", "gateway relay.py"), ("gateway/sse.py", "gateway sse.py"),
    ("gateway/upstream.py", "gateway upstream.py"), ("gateway/metrics.py", "gateway metrics.py"),
    ("gateway/", "gateway (other)"), ("sse_starlette", "sse_starlette"), ("fastapi", "fastapi"),
    ("starlette", "starlette"), ("uvicorn", "uvicorn"), ("httpx_aiohttp", "httpx_aiohttp"),
    ("aiohttp", "aiohttp"), ("httpx", "httpx"), ("httpcore", "httpcore"), ("h11", "h11"), ("anyio", "anyio"),
    ("prometheus_client", "prometheus_client"), ("orjson", "orjson"), ("uvloop", "uvloop"),
    ("asyncio", "asyncio"), ("logging", "logging"), ("pydantic", "pydantic"),
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def category(path: str) -> str:
    return next((name for key, name in CATEGORIES if key in path), "other")


def parse_frame(frame: str) -> tuple[str, str]:
    """(function, file) of one py-spy frame `func (path:line)`."""
    match = _FRAME.match(frame.strip())
    return (match["func"], match["file"]) if match else (frame.strip(), "")


def summarise(raw: str) -> dict[str, Counter[str]]:
    """Counters of samples: self time by category and by function, inclusive time by category."""
    self_cat: Counter[str] = Counter()
    incl_cat: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [parse_frame(f) for f in stack.split(";") if f.strip()]
        frames = [(fn, path) for fn, path in frames if not fn.startswith("process ") and not fn.startswith("thread ")]
        if not frames:
            continue
        self_cat["total"] += count
        fn, path = frames[-1]
        self_cat[category(path)] += count
        self_fn[f"{fn} ({_short(path)})"] += count
        for name in {category(p) for _, p in frames}:
            incl_cat[name] += count
        for name in {f"{f} ({_short(p)})" for f, p in frames}:
            incl_fn[name] += count
    return {"self_category": self_cat, "inclusive_category": incl_cat, "self_function": self_fn,
            "inclusive_function": incl_fn}


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path.split("/main/", 1)[-1]


def markdown(counts: dict[str, Counter[str]], command: str, setup: str, top: int = 20) -> str:
    total = counts["self_category"].pop("total", 0) or 1
    lines = ["```", command, "```", "", setup, "", f"{total} samples of the gateway's busy time.", "",
             "| component | self % (CPU spent in its own frames) | inclusive % (on the stack) |", "|---|---|---|"]
    names = sorted(counts["inclusive_category"], key=lambda n: -counts["self_category"][n])
    for name in names:
        lines.append(f"| {name} | {100 * counts['self_category'][name] / total:.1f} | "
                     f"{100 * counts['inclusive_category'][name] / total:.1f} |")
    lines += ["", f"Top {top} functions by self time:", "", "| function | self % | inclusive % |", "|---|---|---|"]
    for name, count in counts["self_function"].most_common(top):
        inclusive = 100 * counts["inclusive_function"][name] / total
        lines.append(f"| `{name}` | {100 * count / total:.1f} | {inclusive:.1f} |")
    return "\n".join(lines) + "\n"


async def _load(url: str, args: argparse.Namespace) -> dict[str, float]:
    # Streams start spread over one request's duration (within the warm-up): steady state, not lockstep bursts.
    ramp_up_s = min(request_duration_s(args.ttft_ms, args.gap_ms, args.output_len), args.warmup_s)
    config = load_config(url, args.concurrency, output_len=args.output_len, ramp_up_s=ramp_up_s,
                         duration_s=args.warmup_s + args.seconds + 1, label="profile load", progress=False)
    result = await run_scenario(config)
    return {"events_per_s": result.summary["event_throughput"], "errors": sum(result.summary["errors"].values()),
            "ttft_p99_ms": result.summary["ttft_ms"]["p99"] or 0.0}


async def _profile(target_pid: int, url: str, args: argparse.Namespace, raw: Path) -> dict[str, float]:
    load = asyncio.ensure_future(_load(url, args))
    await asyncio.sleep(args.warmup_s)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [spy, "record", "--pid", str(target_pid), "--duration", f"{args.seconds:g}", "--rate", str(args.rate),
            "--format", "raw", "--nonblocking", "--output", str(raw)]
    process = await asyncio.create_subprocess_exec(*pinned(args.client_cpu or None, argv),
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = await process.communicate()
    if process.returncode:
        say(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    return await load


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m loadtest.profile_gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="specgate", help="specgate or specgate:<variant>")
    p.add_argument("--concurrency", type=int, default=300)
    p.add_argument("--gap-ms", type=float, default=2.0)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seconds", type=float, default=20.0, help="sampling time")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--rate", type=int, default=250, help="samples per second")
    p.add_argument("--gateway-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results" / "profile")
    p.add_argument("--report", type=Path, default=Path(__file__).parent / "results" / "profile.md")
    p.add_argument("--append", action="store_true", help="add a section to the report instead of replacing it")
    args = p.parse_args(argv)
    raise_open_file_limit()
    pin_self(args.client_cpu)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw = args.out_dir / f"{args.target.replace(':', '-')}-c{args.concurrency}-gap{args.gap_ms:g}.txt"
    engine_args = engine_timing_args(args.ttft_ms, args.gap_ms, args.output_len)
    import uvloop

    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(engine_args, args.client_cpu or None, args.out_dir))
        target = stack.enter_context(start_target(args.target, engine.url, args.gateway_cpu or None, args.out_dir))
        assert target.pid is not None
        say(f"profiling {args.target} (pid {target.pid}) at {args.concurrency} streams, gap {args.gap_ms:g} ms")
        load = uvloop.run(_profile(target.pid, target.url, args, raw))
    command = shlex.join(["python", "-m", "loadtest.profile_gateway", *argv])
    setup = (f"{args.target} on core {args.gateway_cpu}; fake engine `{' '.join(engine_args)}` and "
             f"{args.concurrency} closed-loop streams on core {args.client_cpu}; py-spy {args.rate} Hz for "
             f"{args.seconds:g} s after {args.warmup_s:g} s of load. Load over the whole run: "
             f"{load['events_per_s']:,.0f} events/s delivered, TTFT p99 {load['ttft_p99_ms']:.0f} ms, "
             f"{load['errors']:.0f} errors.")
    report = f"## Profile of {args.target} under load\n\n" + markdown(summarise(raw.read_text()), command, setup)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.report.exists():
        report = args.report.read_text().rstrip() + "\n\n" + report
    else:
        report = "# Gateway hot-path profiles\n\n" + report
    args.report.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
