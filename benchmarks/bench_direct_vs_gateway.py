"""Benchmark: `vllm bench serve` against a worker directly and through the gateway, in one run.

    python -m benchmarks.bench_direct_vs_gateway --profile cpu-demo --num-prompts 200 --concurrency 32

Starts one worker (bound to core 0) and the gateway as its own process (core 1), runs the same load
alternately direct and through the gateway, and writes a side-by-side table to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.bench_measure import host_steal, steal_share_since
from benchmarks.harness import RESULTS, gateway, run_vllm_bench, worker
from engine.demo_models import default_models_dir

ROWS = [
    ("completed", "completed", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
    ("request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("output throughput (tok/s)", "output_throughput", "{:.1f}"),
    ("mean TTFT (ms)", "mean_ttft_ms", "{:.1f}"),
    ("median TTFT (ms)", "median_ttft_ms", "{:.1f}"),
    ("p99 TTFT (ms)", "p99_ttft_ms", "{:.1f}"),
    ("mean TPOT (ms)", "mean_tpot_ms", "{:.2f}"),
    ("median TPOT (ms)", "median_tpot_ms", "{:.2f}"),
    ("p99 TPOT (ms)", "p99_tpot_ms", "{:.2f}"),
    ("mean ITL (ms)", "mean_itl_ms", "{:.2f}"),
    ("median ITL (ms)", "median_itl_ms", "{:.2f}"),
    ("p99 ITL (ms)", "p99_itl_ms", "{:.2f}"),
    ("mean E2E (ms)", "mean_e2el_ms", "{:.1f}"),
]


def side_by_side(direct: dict[str, float], through: dict[str, float], names: tuple[str, str]) -> str:
    lines = [f"| metric | {names[0]} | {names[1]} | ratio |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        if key not in direct or key not in through:
            continue
        a, b = float(direct[key]), float(through[key])
        ratio = f"{b / a:.3f}" if a else "-"
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    return "\n".join(lines)


def mean_of(results: list[dict[str, float]]) -> dict[str, float]:
    keys = {key for _, key, _ in ROWS}
    return {key: sum(float(r[key]) for r in results) / len(results) for key in keys if all(key in r for r in results)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu-demo")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokenizer", help="defaults to the demo target's directory")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="direct/gateway pairs, alternated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "direct-vs-gateway.md")
    args = parser.parse_args(argv)
    tokenizer = args.tokenizer or str(default_models_dir() / "demo-target")
    bench_args = [
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--model", args.model,
        "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.concurrency), "--ignore-eos", "--seed", str(args.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
    ]
    workdir = Path(tempfile.mkdtemp(prefix="specgate-bench-"))
    steal_before = host_steal()
    direct_runs: list[dict[str, float]] = []
    gateway_runs: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        worker_url = stack.enter_context(worker(args.profile, 8190, "0", workdir))
        gateway_url = stack.enter_context(gateway([worker_url], 8191, 1, workdir))
        for round_index in range(args.rounds):
            for label, url, runs in (("direct", worker_url, direct_runs), ("gateway", gateway_url, gateway_runs)):
                runs.append(run_vllm_bench(url, bench_args, workdir / f"{label}-{round_index}.json", 1))
    steal = steal_share_since(steal_before)
    table = side_by_side(mean_of(direct_runs), mean_of(gateway_runs), ("direct to vLLM", "through specgate"))
    command = "python -m benchmarks.bench_direct_vs_gateway " + " ".join(sys.argv[1:] if argv is None else argv)
    report = (
        f"# vllm bench serve: direct vs through specgate\n\n"
        f"Command: `{command.strip()}`\n\n"
        f"Profile `{args.profile}`, {args.num_prompts} requests, concurrency {args.concurrency}, random "
        f"dataset {args.input_len} in / {args.output_len} out tokens, ignore_eos, {args.rounds} round(s) "
        f"alternated, figures are means over rounds. Worker bound to core 0; gateway and `vllm bench` on "
        f"core 1. CPU time taken by the VM host (steal) during the run: "
        f"{'unknown' if steal is None else f'{steal:.1%}'}.\n\n{table}\n"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
