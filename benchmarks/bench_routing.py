"""Benchmark: routing policies on real vLLM CPU workers with multi-round shared-prefix chat, in one run.

    python -m benchmarks.bench_routing --workers 2 --users 24 --turns 4

Two cpu-baseline workers (prefix caching on, one per core) stay up for the whole run; for each policy a
gateway starts in front of them and the same conversation shape (a fresh system prompt per policy, so no
policy inherits another's warm cache) is replayed. Prefix-cache hit rate and per-worker request counts
come from the workers' own counters. Then one more prefix-aware run kills a worker mid-run and counts
the requests that did not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, gateway, scrape, worker_process
from engine.launch import WorkerProcess
from engine.profiles import find_profile
from engine.supervisor import cpu_binding, cpu_threads
from loadtest.runner import LoadConfig, run_scenario
from loadtest.workloads import SharedPrefixChat

POLICIES = ("round_robin", "least_loaded", "prefix_aware")
COUNTERS = {
    "queries": "vllm:prefix_cache_queries_total",
    "hits": "vllm:prefix_cache_hits_total",
    "requests": "vllm:request_success_total",
}


def counters(url: str) -> dict[str, float]:
    values = dict.fromkeys(COUNTERS, 0.0)
    for line in scrape(url).splitlines():
        for key, name in COUNTERS.items():
            if line.startswith(name + "{") or line.startswith(name + " "):
                values[key] += float(line.rsplit(" ", 1)[1])
    return values


def run_load(gateway_url: str, args: argparse.Namespace, seed: int, label: str) -> dict[str, Any]:
    workload = SharedPrefixChat(
        users=args.users, turns=args.turns, system_tokens=args.system_tokens, user_tokens=args.user_tokens,
        output_len=args.output_len, seed=seed,
    )
    config = LoadConfig(
        base_url=gateway_url, endpoint="chat", model="demo", workload=workload, concurrency=args.concurrency,
        num_requests=args.users * args.turns, ignore_eos=True, seed=seed, label=label,
        headers=(), request_timeout_s=300, read_timeout_s=120,
    )
    return asyncio.run(run_scenario(config)).summary


def measure_policy(policy: str, workers: list[WorkerProcess], args: argparse.Namespace, seed: int,
                   workdir: Path, kill_after_s: float | None = None) -> dict[str, Any]:
    before = [counters(w.url) for w in workers]
    with gateway([w.url for w in workers], 8391, None, workdir, ["--routing", policy]) as gateway_url:
        killed_at: list[float] = []
        killer = None
        if kill_after_s is not None:
            killer = threading.Thread(target=_kill_when_busy, args=(workers[0], kill_after_s, killed_at))
            killer.start()
        started = time.monotonic()
        summary = run_load(gateway_url, args, seed, policy)
        if killer is not None:
            killer.join()
    after = [counters(w.url) if w.alive() else before[i] for i, w in enumerate(workers)]
    per_worker = [after[i]["requests"] - before[i]["requests"] for i in range(len(workers))]
    queries = sum(after[i]["queries"] - before[i]["queries"] for i in range(len(workers)))
    hits = sum(after[i]["hits"] - before[i]["hits"] for i in range(len(workers)))
    mean = sum(per_worker) / len(per_worker)
    return {
        "policy": policy,
        "hit_rate": hits / queries if queries else 0.0,
        "ttft_p50": summary["ttft_ms"]["p50"],
        "ttft_p99": summary["ttft_ms"]["p99"],
        "requests_per_worker": per_worker,
        "imbalance": max(per_worker) / mean if mean else float("nan"),
        "completed": summary["requests"]["completed"],
        "failed": summary["requests"]["failed"],
        "errors": summary["errors"],
        "killed_after_s": killed_at[0] - started if killed_at else None,
        "duration_s": summary["duration_s"],
    }


def _kill_when_busy(victim: WorkerProcess, after_s: float, killed_at: list[float]) -> None:
    """SIGKILL the worker once `after_s` passed and it has requests running (so the kill costs something)."""
    time.sleep(after_s)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = sum(
            float(line.rsplit(" ", 1)[1]) for line in scrape(victim.url).splitlines()
            if line.startswith("vllm:num_requests_running")
        )
        if running > 0:
            break
        time.sleep(0.05)
    victim.kill()
    killed_at.append(time.monotonic())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=700)
    parser.add_argument("--user-tokens", type=int, default=48)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kill-after-s", type=float, default=3.0)
    parser.add_argument("--only-kill", action="store_true", help="skip the policy comparison")
    parser.add_argument("--output", type=Path, default=RESULTS / "routing.md")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="specgate-routing-"))
    rows: list[dict[str, Any]] = []
    profile, count = find_profile("cpu-baseline"), args.workers
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(worker_process("cpu-baseline", 8380 + i, cpu_binding(i, profile, count), workdir,
                                               cpu_threads(profile, count)))
            for i in range(args.workers)
        ]
        for seed, policy in enumerate(() if args.only_kill else POLICIES, start=1):
            rows.append(measure_policy(policy, workers, args, seed, workdir))
        killed = measure_policy("prefix_aware", workers, args, 99, workdir, kill_after_s=args.kill_after_s)
    command = "python -m benchmarks.bench_routing " + " ".join(sys.argv[1:] if argv is None else argv)
    report = render(rows, killed, args, command)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    if rows:
        plot(rows, args.output.with_suffix(".png"))
    print("\n" + report)
    return 0


def render(rows: list[dict[str, Any]], killed: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# Routing policies on real vLLM CPU workers: multi-round shared-prefix chat\n",
        f"Command: `{command.strip()}`\n",
        f"{args.workers} cpu-baseline workers (prefix caching on), {args.users} users x {args.turns} turns, "
        f"shared system prompt ~{args.system_tokens} tokens, {args.user_tokens}-token user turns, "
        f"{args.output_len} output tokens, {args.concurrency} concurrent users.\n",
        "| policy | prefix-cache hit rate | TTFT p50 (ms) | TTFT p99 (ms) | requests per worker | "
        "max/mean load | failed |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['policy']} | {row['hit_rate']:.3f} | {row['ttft_p50']:.1f} | {row['ttft_p99']:.1f} | "
            f"{', '.join(f'{n:.0f}' for n in row['requests_per_worker'])} | {row['imbalance']:.2f} | "
            f"{row['failed']} |"
        )
    when = "never (the run ended first)" if killed["killed_after_s"] is None else f"{killed['killed_after_s']:.1f}s"
    lines += [
        "",
        f"One of the {args.workers} workers killed (SIGKILL, while it had requests running) {when} into a "
        f"{killed['duration_s']:.1f}s prefix-aware run of {killed['completed'] + killed['failed']} requests: "
        f"{killed['completed']} completed, {killed['failed']} failed ({killed['errors']}). Streams running on "
        f"the killed worker end with an error event (counted failed); requests not yet started go to the "
        f"survivor.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [row["policy"] for row in rows]
    axes[0].bar(names, [row["hit_rate"] for row in rows])
    axes[0].set_title("prefix-cache hit rate")
    axes[1].bar(names, [row["ttft_p50"] for row in rows], label="p50")
    axes[1].bar(names, [row["ttft_p99"] - row["ttft_p50"] for row in rows],
                bottom=[row["ttft_p50"] for row in rows], label="p99", alpha=0.6)
    axes[1].set_title("TTFT (ms)")
    axes[1].legend()
    axes[2].bar(names, [row["imbalance"] for row in rows])
    axes[2].set_title("max/mean requests per worker")
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=15)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
