"""Benchmark: one key's limits enforced together by two gateway replicas sharing Redis, and what the limit checks
add to TTFT.

    flock /tmp/specgate-heavy.lock python -m benchmarks.bench_tenants

Part 1 (exactness): a key with RPM 600 and TPM 60,000 (`--rpm`, `--tpm`), two gateway replicas sharing one real
redis-server, each driven with Poisson arrivals so that together they offer 3x both rates (`--overload`) for
`--duration-s` (default 120 s): streamed chat, prompts of 50 tokens and 50 output tokens (the fake engine, a test
double for a vLLM worker, answers in fixed time). Reported: requests and tokens admitted against what the limits
allow over the run (a sliding 60-second window allows `limit x duration / 60`, the first window's allowance
included), the most admitted in any 60-second window by send time, 429s and 5xx.

Part 2 (overhead): 100 closed-loop streams through one gateway without keys, with a keys file held in-process,
and with the same keys in Redis, rounds interleaved (`--rounds`); the key's limits are set far above the load, so
every request runs the whole check and none is refused. TTFT p50 and p99 per set-up and the difference to the
gateway without keys.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench_targets import run_process, start_engine
from benchmarks.harness import RESULTS
from engine.launch import say
from loadtest.load_config import LoadConfig
from loadtest.procs import free_port
from loadtest.records import RequestResult
from loadtest.redis_server import running_redis
from loadtest.runner import run_scenario
from loadtest.workloads import RandomPrompts

SECRET = "sk-bench-tenant"
ADMIN_SECRET = "sk-bench-admin"
PROMPT_TOKENS = 50
OUTPUT_TOKENS = 50


def write_keys(path: Path, entries: dict[str, dict[str, Any]]) -> Path:
    """A keys file (JSON is YAML) of secret -> the entry's fields; the secret's SHA-256 goes in."""
    keys = [{**fields, "sha256": hashlib.sha256(secret.encode()).hexdigest()} for secret, fields in entries.items()]
    path.write_text(json.dumps({"keys": keys}))
    return path


def keys_file(path: Path, rpm: int, tpm: int) -> Path:
    return write_keys(path, {SECRET: {"name": "bench", "rpm": rpm, "tpm": tpm},
                             ADMIN_SECRET: {"name": "admin", "admin": True}})


def gateway(engine_url: str, cpu: str | None, log_dir: Path, env: dict[str, str]) -> Any:
    """A gateway process in front of `engine_url` with `env`: its URL and the context manager that runs it."""
    port = free_port()
    argv = [sys.executable, "-m", "gateway.cli", "gateway", "--workers", engine_url, "--port", str(port),
            "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    return url, run_process(f"gateway-{port}", argv, url + "/ready", cpu, log_dir,
                            {"SPECGATE_REQUEST_LOG": "false", **env})


def load(url: str, secret: str = SECRET, **overrides: Any) -> LoadConfig:
    workload = RandomPrompts(input_len=PROMPT_TOKENS, output_len=OUTPUT_TOKENS, seed=overrides.pop("seed", 0))
    return LoadConfig(base_url=url, workload=workload, ignore_eos=True, num_requests=None, progress=False,
                      headers=(("authorization", f"Bearer {secret}"),), **overrides)


async def drive_replicas(urls: Sequence[str], rate: float, duration_s: float) -> list[RequestResult]:
    runs = await asyncio.gather(*(
        run_scenario(load(url, rate=rate / len(urls), duration_s=duration_s, seed=index))
        for index, url in enumerate(urls)))
    return [record for run in runs for record in run.records]


def admin_usage(url: str) -> dict[str, int]:
    request = urllib.request.Request(url + "/admin/usage", headers={"authorization": f"Bearer {ADMIN_SECRET}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        usage: dict[str, int] = json.loads(reply.read())["keys"].get("bench", {})
        return usage


def most_in_window(starts: list[float], window_s: float = 60.0) -> int:
    starts = sorted(starts)
    most, first = 0, 0
    for last, at in enumerate(starts):
        while at - starts[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def exactness(args: argparse.Namespace, engine_url: str, workdir: Path) -> dict[str, Any]:
    keys = keys_file(workdir / "keys-exact.yaml", args.rpm, args.tpm)
    rate = args.overload * args.rpm / 60
    with running_redis() as redis_url:
        env = {"SPECGATE_KEYS_FILE": str(keys), "SPECGATE_REDIS_URL": redis_url}
        first_url, first = gateway(engine_url, "0", workdir, env)
        second_url, second = gateway(engine_url, "0", workdir, env)
        with first, second:
            say(f"exactness: {rate:.1f} req/s offered for {args.duration_s:g}s over two replicas")
            records = asyncio.run(drive_replicas([first_url, second_url], rate, args.duration_s))
            usage = admin_usage(first_url)
    admitted = [r for r in records if r.status == 200]
    allowed_windows = args.duration_s / 60
    tokens = usage.get("prompt_tokens", 0) + usage.get("output_tokens", 0)
    return {
        "offered_requests": len(records), "admitted_requests": len(admitted),
        "allowed_requests": args.rpm * allowed_windows,
        "admitted_tokens": tokens, "allowed_tokens": args.tpm * allowed_windows,
        "most_requests_in_60s": most_in_window([r.start_s for r in admitted]),
        "refused_429": sum(r.status == 429 for r in records),
        "errors_5xx": sum((r.status or 0) >= 500 for r in records),
        "other_failures": sum(not r.ok and r.status not in (429,) and (r.status or 0) < 500 for r in records),
        "usage": usage,
    }


def overhead(args: argparse.Namespace, engine_url: str, workdir: Path) -> dict[str, list[list[float]]]:
    """TTFTs (ms) per set-up, round by round."""
    keys = keys_file(workdir / "keys-overhead.yaml", 10**9, 10**12)
    ttfts: dict[str, list[list[float]]] = {"no keys": [], "keys, in-process": [], "keys, Redis": []}
    with running_redis() as redis_url:
        setups = {"no keys": {}, "keys, in-process": {"SPECGATE_KEYS_FILE": str(keys)},
                  "keys, Redis": {"SPECGATE_KEYS_FILE": str(keys), "SPECGATE_REDIS_URL": redis_url}}
        for round_index in range(args.rounds):
            for name, env in setups.items():
                url, process = gateway(engine_url, "0", workdir, env)
                with process:
                    say(f"overhead round {round_index + 1}/{args.rounds}: {name}")
                    run = asyncio.run(run_scenario(load(url, concurrency=args.streams, ramp_up_s=2.0,
                                                        duration_s=args.overhead_s, seed=round_index)))
                ttfts[name].append([r.ttft_s * 1000 for r in run.records if r.ok and r.ttft_s is not None
                                    and not r.ramp_up])
    return ttfts


def previous_exactness(report_path: Path) -> list[str]:
    """The exactness section of the last full run's report, for a run of the TTFT part alone."""
    lines = report_path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## One key"))
    end = next(i for i, line in enumerate(lines) if line.startswith("## TTFT"))
    kept = [line for line in lines[start:end] if not line.startswith("(From the last full run")]
    return [kept[0], "", "(From the last full run, `python -m benchmarks.bench_tenants`.)", *kept[1:]]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def exactness_section(args: argparse.Namespace, exact: dict[str, Any]) -> list[str]:
    return [
        f"## One key, RPM {args.rpm} and TPM {args.tpm}, two replicas sharing Redis, {args.overload:g}x offered "
        f"for {args.duration_s:g} s", "",
        "| | admitted | the limits allow | ratio |", "|---|---:|---:|---:|",
        f"| requests | {exact['admitted_requests']} | {exact['allowed_requests']:.0f} | "
        f"{exact['admitted_requests'] / exact['allowed_requests']:.4f} |",
        f"| tokens (prompt + output) | {exact['admitted_tokens']} | {exact['allowed_tokens']:.0f} | "
        f"{exact['admitted_tokens'] / exact['allowed_tokens']:.4f} |", "",
        f"Offered {exact['offered_requests']} requests; refused with 429: {exact['refused_429']}; 5xx: "
        f"{exact['errors_5xx']}; other failures: {exact['other_failures']}. Most requests admitted in any 60 s "
        f"(by send time): {exact['most_requests_in_60s']} (limit {args.rpm}). Usage as `GET /admin/usage` "
        f"reports it: `{json.dumps(exact['usage'])}`.", "",
    ]


def report(args: argparse.Namespace, exactness_lines: list[str], ttfts: dict[str, list[list[float]]]) -> str:
    command = "python -m benchmarks.bench_tenants " + " ".join(sys.argv[1:])
    lines = [
        "# Tenants: one limit across two replicas, and what the checks cost", "", f"Command: `{command.strip()}`", "",
        *exactness_lines,
        f"## TTFT at {args.streams} streams, {args.rounds} interleaved rounds of {args.overhead_s:g} s", "",
        "| set-up | requests | TTFT p50 (ms) | TTFT p99 (ms) | p50 by round (ms) | p50 added, median of the rounds' "
        "differences (ms) |", "|---|---:|---:|---:|---|---:|",
    ]
    base_rounds = [percentile(values, 50) for values in ttfts["no keys"]]
    for name, rounds in ttfts.items():
        pooled = [value for values in rounds for value in values]
        by_round = [percentile(values, 50) for values in rounds]
        added = statistics.median(p50 - base for p50, base in zip(by_round, base_rounds, strict=True))
        lines.append(f"| {name} | {len(pooled)} | {percentile(pooled, 50):.2f} | {percentile(pooled, 99):.2f} | "
                     f"{' / '.join(f'{p50:.2f}' for p50 in by_round)} | {added:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, default=60_000)
    parser.add_argument("--overload", type=float, default=3.0)
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-exactness", action="store_true", help="only the TTFT part (the report keeps "
                        "the exactness section of the previous report)")
    parser.add_argument("--overhead-s", type=float, default=20.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "tenants.md")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="specgate-tenants-"))
    engine_args = ["--ttft-ms", "20", "--gap-ms", "10", "--output-len", str(OUTPUT_TOKENS), "--prompt-tokens",
                   str(PROMPT_TOKENS)]
    with start_engine(engine_args, "1", workdir) as engine:
        exact = (previous_exactness(args.output) if args.skip_exactness
                 else exactness_section(args, exactness(args, engine.url, workdir)))
        ttfts = overhead(args, engine.url, workdir)
    args.output.write_text(report(args, exact, ttfts))
    say(f"wrote {args.output}")
    print(args.output.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
