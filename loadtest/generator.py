"""`specgate loadtest`: drive an OpenAI-compatible endpoint with streaming load and report what the client saw."""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

from loadtest.runner import LoadConfig, RunResult, run_scenario, run_sweep
from loadtest.summary import SLO_NAMES
from loadtest.targets import TargetRefused
from loadtest.workloads import RandomPrompts, SharedPrefixChat, TraceReplay, Workload

__all__ = ["LoadConfig", "RunResult", "main", "run_scenario", "run_sweep"]

_UNITS = MappingProxyType({"ms": 1e-3, "s": 1.0, "us": 1e-6})


def parse_slo(text: str) -> tuple[str, float]:
    """`ttft=500ms`, `tpot=50ms`, `e2e=2s` (a bare number is milliseconds, as in vllm bench) -> (name, seconds)."""
    name, sep, value = text.partition("=")
    if not sep:
        name, sep, value = text.partition(":")  # vllm bench's KEY:VALUE form
    name = {"e2el": "e2e"}.get(name.strip(), name.strip())
    if not sep or name not in SLO_NAMES:
        raise argparse.ArgumentTypeError(f"expected {'|'.join(SLO_NAMES)}=VALUE[ms|s], got {text!r}")
    value = value.strip()
    unit = next((u for u in ("ms", "us", "s") if value.endswith(u)), "ms")
    try:
        return name, float(value.removesuffix(unit)) * _UNITS[unit]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad SLO value in {text!r}") from exc


def parse_sweep(text: str) -> tuple[str, list[float]]:
    kind, sep, values = text.partition("=")
    if not sep or kind not in ("concurrency", "rate"):
        raise argparse.ArgumentTypeError(f"expected concurrency=1,10,100 or rate=5,10,20, got {text!r}")
    try:
        return kind, [float(v) for v in values.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad levels in {text!r}") from exc


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specgate loadtest", description=__doc__)
    target = p.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000", help="loopback only unless --allow-remote")
    target.add_argument("--endpoint", default="chat", help="chat | completions | a path (default chat)")
    target.add_argument("--model", default="demo")
    target.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target you own")
    target.add_argument("--header", type=_header, action="append", default=[], metavar="NAME:VALUE")
    target.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    work = p.add_argument_group("workload")
    work.add_argument("--workload", choices=("random", "long-prompt", "shared-prefix", "trace"), default="random")
    work.add_argument("--input-len", type=int, help="prompt tokens (random: 256, long-prompt: 4000)")
    work.add_argument("--output-len", type=int, default=128, help="max tokens per request")
    work.add_argument("--ignore-eos", action="store_true", help="ask for exactly --output-len tokens (vLLM extra)")
    work.add_argument("--users", type=int, default=32, help="shared-prefix: number of users")
    work.add_argument("--turns", type=int, default=4, help="shared-prefix: rounds per user")
    work.add_argument("--system-tokens", type=int, default=1024, help="shared-prefix: shared system prompt size")
    work.add_argument("--user-tokens", type=int, default=64, help="shared-prefix: tokens per user message")
    work.add_argument("--trace", type=Path, help="trace: JSONL of {timestamp, prompt|messages, max_tokens}")
    work.add_argument("--time-scale", type=float, default=1.0, help="trace: multiply timestamps by this")
    load = p.add_argument_group("load (bounded: --num-requests and/or --duration)")
    load.add_argument("--concurrency", type=int, default=1, help="closed loop: this many streams at once")
    load.add_argument("--ramp-up", type=float, default=0.0, metavar="SECONDS",
                      help="closed loop: start the streams spread over this long; requests sent meanwhile, and "
                           "each stream's first, are delivered but not measured (steady state instead of "
                           "streams in lockstep)")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second (sessions for chat)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    load.add_argument("--max-concurrency", type=int, help="with --rate: cap on requests in flight")
    load.add_argument("--sweep", type=parse_sweep, help="concurrency=1,10,100 or rate=5,10,20")
    load.add_argument("--num-requests", type=int, help="stop issuing after this many (default 100 without --duration)")
    load.add_argument("--duration", type=float, help="stop issuing after this many seconds")
    load.add_argument("--drain-timeout", type=float, default=30.0, help="after --duration, cancel stragglers after")
    load.add_argument("--warmup", type=int, default=0, help="unmeasured requests first")
    load.add_argument("--request-timeout", type=float, default=600.0)
    load.add_argument("--read-timeout", type=float, default=60.0, help="longest silence within a stream")
    load.add_argument("--no-continuous-usage", action="store_true", help="for endpoints that reject it")
    load.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--slo", type=parse_slo, action="append", default=[], metavar="NAME=VALUE",
                     help="goodput SLO, e.g. ttft=500ms, tpot=50ms, e2e=2s (repeatable)")
    out.add_argument("--percentiles", default="50,90,99")
    out.add_argument("--output-dir", type=Path, help="default results/loadtest-<time>")
    out.add_argument("--label", default="")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-progress", action="store_true")
    return p


def _workload(args: argparse.Namespace) -> Workload:
    if args.workload == "shared-prefix":
        return SharedPrefixChat(users=args.users, turns=args.turns, system_tokens=args.system_tokens,
                                user_tokens=args.user_tokens, output_len=args.output_len, seed=args.seed)
    if args.workload == "trace":
        if args.trace is None:
            raise ValueError("--workload trace needs --trace FILE")
        return TraceReplay(args.trace, time_scale=args.time_scale)
    default_len = 4000 if args.workload == "long-prompt" else 256
    return RandomPrompts(input_len=args.input_len or default_len, output_len=args.output_len, seed=args.seed)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    headers = list(args.header)
    if args.api_key:
        headers.append(("Authorization", f"Bearer {args.api_key}"))
    num_requests = args.num_requests if args.num_requests or args.duration else 100
    return LoadConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model, workload=_workload(args),
        concurrency=args.concurrency, rate=args.rate, burstiness=args.burstiness, ramp_up_s=args.ramp_up,
        max_concurrency=args.max_concurrency, num_requests=num_requests, duration_s=args.duration,
        drain_timeout_s=args.drain_timeout, warmup_requests=args.warmup, ignore_eos=args.ignore_eos,
        continuous_usage=not args.no_continuous_usage, headers=tuple(headers),
        request_timeout_s=args.request_timeout, read_timeout_s=args.read_timeout, slos_s=tuple(args.slo),
        percentiles=tuple(float(p) for p in args.percentiles.split(",")), allow_remote=args.allow_remote,
        seed=args.seed, progress=not args.no_progress, label=args.label,
    )


def _command(argv: Sequence[str]) -> str:
    # Never write the API key into results.
    shown = ["<redacted>" if previous == "--api-key" else arg for previous, arg in zip(["", *argv], argv, strict=False)]
    return shlex.join(["specgate", "loadtest", *shown])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    out_dir = args.output_dir or Path("results") / time.strftime("loadtest-%Y%m%d-%H%M%S")
    command = _command(argv)

    import uvloop

    from loadtest.procs import raise_open_file_limit
    from loadtest.report import markdown, write_run, write_sweep

    raise_open_file_limit()
    # Objects alive now live for the whole run; frozen, they never make a collection pause a stream's timing.
    gc.collect()
    gc.freeze()
    try:
        if args.sweep is not None:
            kind, levels = args.sweep
            results = uvloop.run(run_sweep(config, kind, levels))
            write_sweep(results, kind, out_dir, command=command, plots=not args.no_plots)
            print((out_dir / "sweep.md").read_text())
        else:
            results = [uvloop.run(run_scenario(config))]
            write_run(results[0], out_dir, command=command, plots=not args.no_plots)
            print(markdown(results[0], command))
    except TargetRefused as exc:
        print(f"specgate loadtest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"results in {out_dir}/", file=sys.stderr)
    # Non-zero when nothing at all succeeded, so scripts notice a dead target.
    return 0 if any(r.summary["requests"]["completed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
