"""Benchmark: `vllm bench serve` against a worker directly and through the gateway, in one run.

    python -m loadtest.bench_direct_vs_gateway --profile cpu-demo --num-prompts 200 --concurrency 32

Starts one worker (pinned to core 0) and the gateway as its own process (core 1) unless --worker-url
and --gateway-url are given, runs the same load alternately direct and through the gateway, and writes
a side-by-side table to loadtest/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from engine.config import find_profile, render
from engine.launch import WorkerProcess, say
from engine.models import build_demo_models, default_models_dir

RESULTS = Path(__file__).parent / "results"
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


def _pinned(core: int | None, argv: list[str]) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", str(core), *argv]


@contextlib.contextmanager
def _worker(profile_name: str, log_dir: Path) -> Iterator[str]:
    profile = find_profile(profile_name)
    models_dir = default_models_dir()
    if "{models_dir}" in profile.model:
        build_demo_models(models_dir)
    port = 8190
    command = render(profile, host="127.0.0.1", port=port, models_dir=models_dir, cpu_bind="0")
    worker = WorkerProcess(command, port, log_dir / "bench-worker.log", name="bench-worker")
    worker.start()
    try:
        worker.wait_ready(600, say)
        yield worker.url
    finally:
        worker.stop()


@contextlib.contextmanager
def _gateway(worker_url: str, core: int | None, log_dir: Path) -> Iterator[str]:
    port = 8191
    argv = [sys.executable, "-m", "gateway.cli", "gateway", "--workers", worker_url, "--port", str(port),
            "--log-level", "warning"]
    env = {**os.environ, "SPECGATE_REQUEST_LOG": "false"}
    with (log_dir / "bench-gateway.log").open("wb") as log:
        process = subprocess.Popen(_pinned(core, argv), stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        import urllib.request

        while True:
            try:
                with urllib.request.urlopen(url + "/ready", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"gateway did not become ready; see {log_dir / 'bench-gateway.log'}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_vllm_bench(
    base_url: str, args: argparse.Namespace, tokenizer: str, out: Path, core: int | None
) -> dict[str, float]:
    argv = [
        sys.executable, "-m", "loadtest.vllm_bench", "serve",
        "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
        "--model", args.model, "--tokenizer", tokenizer, "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
        "--ignore-eos", "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(out.parent),
        "--result-filename", out.name,
    ]
    say(f"vllm bench serve -> {base_url} ({args.num_prompts} requests at concurrency {args.concurrency})")
    subprocess.run(_pinned(core, argv), check=True)
    result: dict[str, float] = json.loads(out.read_text())
    return result


def side_by_side(direct: dict[str, float], gateway: dict[str, float]) -> str:
    lines = ["| metric | direct to vLLM | through specgate | ratio |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        if key not in direct or key not in gateway:
            continue
        a, b = float(direct[key]), float(gateway[key])
        ratio = f"{b / a:.3f}" if a else "-"
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    return "\n".join(lines)


def _mean(results: list[dict[str, float]]) -> dict[str, float]:
    keys = {key for _, key, _ in ROWS}
    return {key: sum(float(r[key]) for r in results) / len(results) for key in keys if all(key in r for r in results)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu-demo")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokenizer", help="defaults to the demo target's directory")
    parser.add_argument("--worker-url")
    parser.add_argument("--gateway-url")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="direct/gateway pairs, alternated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "direct-vs-gateway.md")
    args = parser.parse_args(argv)
    tokenizer = args.tokenizer or str(default_models_dir() / "demo-target")
    workdir = Path(tempfile.mkdtemp(prefix="specgate-bench-"))
    with contextlib.ExitStack() as stack:
        worker_url = args.worker_url or stack.enter_context(_worker(args.profile, workdir))
        gateway_url = args.gateway_url or stack.enter_context(_gateway(worker_url, 1, workdir))
        client_core = 1 if not args.worker_url else None
        direct_runs, gateway_runs = [], []
        for round_index in range(args.rounds):
            for label, url, runs in (("direct", worker_url, direct_runs), ("gateway", gateway_url, gateway_runs)):
                out = workdir / f"{label}-{round_index}.json"
                runs.append(run_vllm_bench(url, args, tokenizer, out, client_core))
    table = side_by_side(_mean(direct_runs), _mean(gateway_runs))
    command = "python -m loadtest.bench_direct_vs_gateway " + " ".join(sys.argv[1:] if argv is None else argv)
    report = (
        f"# vllm bench serve: direct vs through specgate\n\n"
        f"Command: `{command.strip()}`\n\n"
        f"Profile `{args.profile}`, {args.num_prompts} requests, concurrency {args.concurrency}, random "
        f"dataset {args.input_len} in / {args.output_len} out tokens, ignore_eos, {args.rounds} round(s) "
        f"alternated. Worker pinned to core 0; gateway and load generator on core 1.\n\n{table}\n"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
