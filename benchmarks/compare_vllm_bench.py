"""Cross-check: `vllm bench serve` and `specgate loadtest` on the same load against one fake engine, side by side.

    .venv/bin/python -m benchmarks.compare_vllm_bench --tokenizer /tmp/quickmodels/demo-target \\
        --num-prompts 200 --concurrency 16

The fake engine runs pinned to one core and each client in turn on the other; rounds alternate which client
goes first. Each metric is shown for both with the ratio ours / vllm bench; rows off by more than 5% are flagged.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

from loadtest.procs import free_port, pinned, wait_healthy
from loadtest.records import CLIENT, OK, RequestResult
from loadtest.summary import summarize

TOLERANCE = 0.05
# (label, vllm bench result key, our summary path)
ROWS = (
    ("completed", "completed", ("requests", "completed")),
    ("request throughput (req/s)", "request_throughput", ("request_throughput",)),
    ("output throughput (tok/s)", "output_throughput", ("output_throughput",)),
    *((f"{stat} {name} (ms)", f"{key_stat}_{vkey}_ms", (f"{okey}_ms", ours))
      for name, vkey, okey in (("TTFT", "ttft", "ttft"), ("TPOT", "tpot", "tpot"), ("ITL", "itl", "itl"),
                               ("E2E", "e2el", "e2e"))
      for stat, key_stat, ours in (("mean", "mean", "mean"), ("p50", "median", "p50"), ("p90", "p90", "p90"),
                                   ("p99", "p99", "p99"))),
)


def run_vllm_bench(args: argparse.Namespace, url: str, out_dir: Path, name: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "loadtest.vllm_bench", "serve", "--backend", "openai-chat", "--base-url", url,
            "--endpoint", "/v1/chat/completions", "--model", "demo", "--tokenizer", str(args.tokenizer),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(args.concurrency), "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99", "--save-result", "--result-dir", str(out_dir),
            "--result-filename", f"{name}.json", "--disable-tqdm", "--seed", str(args.seed), "--save-detailed"]
    if args.rate is not None:
        argv += ["--request-rate", str(args.rate)]
    subprocess.run(pinned(args.client_cpu, argv), check=True, stdout=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads((out_dir / f"{name}.json").read_text())
    return result


def run_ours(args: argparse.Namespace, url: str, out_dir: Path, name: str) -> dict[str, Any]:
    # One unmeasured request first, as vllm bench's initial test run.
    argv = [sys.executable, "-m", "loadtest.generator", "--base-url", url, "--endpoint", "chat", "--model", "demo",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos",
            "--num-requests", str(args.num_prompts), "--warmup", "1",
            "--seed", str(args.seed), "--no-progress", "--no-plots", "--output-dir", str(out_dir / name)]
    if args.rate is not None:
        argv += ["--rate", str(args.rate), "--max-concurrency", str(args.concurrency)]
    else:
        argv += ["--concurrency", str(args.concurrency)]
    subprocess.run(pinned(args.client_cpu, argv), check=True, stdout=subprocess.DEVNULL)
    summary: dict[str, Any] = json.loads((out_dir / name / "summary.json").read_text())
    return summary


def _ours(summary: dict[str, Any], path: tuple[str, ...]) -> float:
    value: Any = summary
    for key in path:
        value = value[key]
    return float(value)


def recompute(vllm_result: dict[str, Any]) -> dict[str, Any]:
    """Our summary of vllm bench's own per-request timings (--save-detailed): same inputs, our formulas."""
    records = [
        RequestResult(index=i, kind=OK if not error else CLIENT, ttft_s=ttft, latency_s=latency, itl_s=list(itl),
                      output_tokens=output_len, prompt_tokens=input_len)
        for i, (ttft, latency, itl, output_len, input_len, error) in enumerate(zip(
            vllm_result["ttfts"], vllm_result["latencies"], vllm_result["itls"], vllm_result["output_lens"],
            vllm_result["input_lens"], vllm_result["errors"], strict=True))
    ]
    return summarize(records, vllm_result["duration"], percentiles=(50.0, 90.0, 99.0))


def table(vllm_runs: list[dict[str, Any]], our_runs: list[dict[str, Any]], ours_name: str,
          digits: int = 3) -> tuple[str, list[dict[str, Any]]]:
    """Median over rounds of each metric (one disturbed round on a shared machine does not move it)."""
    rows = []
    for label, vkey, path in ROWS:
        theirs = [float(run[vkey]) for run in vllm_runs]
        ours = [_ours(run, path) for run in our_runs]
        ratio = median(ours) / median(theirs) if median(theirs) else float("nan")
        rows.append({"metric": label, "vllm_bench": median(theirs), "ours": median(ours), "ratio": ratio,
                     "vllm_bench_rounds": theirs, "ours_rounds": ours})
    return render(rows, ours_name, digits), rows


def render(rows: list[dict[str, Any]], ours_name: str, digits: int = 3) -> str:
    lines = [f"| metric | vllm bench | {ours_name} | ratio | rounds: vllm bench / ours |", "|---|---|---|---|---|"]
    for row in rows:
        flag = "" if abs(row["ratio"] - 1) <= TOLERANCE else " ⚠"
        rounds = " / ".join(", ".join(f"{v:.1f}" for v in row[key]) for key in ("vllm_bench_rounds", "ours_rounds"))
        lines.append(f"| {row['metric']} | {row['vllm_bench']:.{digits}f} | {row['ours']:.{digits}f} | "
                     f"{row['ratio']:.{digits}f}{flag} | {rounds} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_vllm_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=Path("/tmp/quickmodels/demo-target"),
                        help="a tokenizer directory for vllm bench's random dataset")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop streams (with --rate: the cap)")
    parser.add_argument("--rate", type=float, help="Poisson arrivals per second instead of a closed loop")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="fake engine time to first token")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="fake engine gap between tokens")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (first client alternates)")
    parser.add_argument("--engine-cpu", default="0", help="core for the fake engine ('' = no pinning)")
    parser.add_argument("--client-cpu", default="1", help="core for the clients ('' = no pinning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-dir", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.tokenizer / "tokenizer_config.json").exists() and not (args.tokenizer / "tokenizer.json").exists():
        print(f"no tokenizer in {args.tokenizer}; pass --tokenizer DIR", file=sys.stderr)
        return 2
    out_dir = args.result_dir or Path("benchmarks/results") / time.strftime("compare-vllm-bench-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine_argv = [sys.executable, "-m", "loadtest.fake_engine", "--port", str(port), "--ttft-ms", str(args.ttft_ms),
                   "--gap-ms", str(args.gap_ms), "--output-len", str(args.output_len)]
    engine = subprocess.Popen(pinned(args.engine_cpu, engine_argv))
    vllm_runs: list[dict[str, Any]] = []
    our_runs: list[dict[str, Any]] = []
    try:
        wait_healthy(url)
        for round_ in range(args.rounds):
            order = ("vllm", "ours") if round_ % 2 == 0 else ("ours", "vllm")
            for client in order:
                print(f"round {round_ + 1}/{args.rounds}: {client}", file=sys.stderr, flush=True)
                if client == "vllm":
                    vllm_runs.append(run_vllm_bench(args, url, out_dir, f"vllm-{round_}"))
                else:
                    our_runs.append(run_ours(args, url, out_dir, f"ours-{round_}"))
    finally:
        engine.terminate()
        engine.wait(timeout=10)
    text, rows = table(vllm_runs, our_runs, "specgate loadtest")
    # Same per-request timings through both sets of formulas: any difference is a definition difference.
    check_text, check_rows = table(vllm_runs, [recompute(run) for run in vllm_runs], "ours on vllm's timings", 6)
    command = " ".join(["python -m benchmarks.compare_vllm_bench", *(argv if argv is not None else sys.argv[1:])])
    arrivals = f"Poisson {args.rate}/s capped at {args.concurrency}" if args.rate else f"concurrency {args.concurrency}"
    load = (f"fake engine ttft={args.ttft_ms}ms gap={args.gap_ms}ms; random prompts {args.input_len} in / "
            f"{args.output_len} out, ignore_eos, {args.num_prompts} requests, {arrivals}, {args.rounds} round(s)")
    report = (f"# vllm bench serve vs specgate loadtest\n\n```\n{command}\n```\n\n{load}; median of rounds.\n\n"
              f"## Measured live, each client on the same load\n\n{text}\n"
              f"## Definitions: our summary code on vllm bench's own per-request timings\n\n{check_text}")
    (out_dir / "compare.md").write_text(report)
    (out_dir / "compare.json").write_text(json.dumps(
        {"command": command, "load": load, "live": rows, "definitions": check_rows}, indent=2))
    print(report)
    for name, table_rows in (("live", rows), ("definitions", check_rows)):
        off = [row["metric"] for row in table_rows if not abs(row["ratio"] - 1) <= TOLERANCE]
        print(f"{name}: within {TOLERANCE:.0%} on {len(table_rows) - len(off)}/{len(table_rows)} metrics"
              + (f"; off: {off}" if off else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
