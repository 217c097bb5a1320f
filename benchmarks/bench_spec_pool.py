"""Benchmark: a pool of two workers, speculating or not, routed by least_loaded or spec_aware, in one run.

    flock /tmp/specgate-heavy.lock python -m benchmarks.bench_spec_pool --concurrency 1 2 4 8 16 32

Four set-ups of two SmolLM2-135M-Instruct workers (each pinned to its own core) behind one gateway: both
speculating with the EAGLE-3 draft (cpu-smollm2-eagle3), neither (cpu-smollm2), and one of each under
`least_loaded` and under `spec_aware`. For each, `vllm bench serve` sends greedy held-out chat prompts
(benchmarks/bench_speculation.py's) at each concurrency, in rising order, through the gateway; the spec_aware
gateway learns from those same requests as it goes. Goodput here is requests per second whose TPOT met
--tpot-slo-ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench_speculation import build_prompts
from benchmarks.harness import RESULTS, gateway, run_vllm_bench, worker
from engine.demo_models import default_models_dir
from engine.smollm2.target import TARGET_DIR

SPECULATING, PLAIN = "cpu-smollm2-eagle3", "cpu-smollm2"
MIXED = (SPECULATING, PLAIN)
SETUPS = (
    ("both speculating", (SPECULATING, SPECULATING), "least_loaded"),
    ("neither", (PLAIN, PLAIN), "least_loaded"),
    ("one of each, least_loaded", MIXED, "least_loaded"),
    ("one of each, spec_aware", MIXED, "spec_aware"),
)
WORKER_PORTS = (8390, 8391)
GATEWAY_PORTS = (8392, 8393)


@contextlib.contextmanager
def pool(profiles: Sequence[str], workdir: Path) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(worker(profile, port, str(core), workdir))
               for core, (profile, port) in enumerate(zip(profiles, WORKER_PORTS, strict=True))]


def measure(gateway_url: str, setup: str, args: argparse.Namespace, prompts: Path, workdir: Path
            ) -> list[dict[str, Any]]:
    tokenizer = str(default_models_dir() / TARGET_DIR)
    rows = []
    for concurrency in args.concurrency:
        requests = max(args.min_requests, concurrency * args.requests_per_stream)
        bench_args = [
            "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--model", "smollm2",
            "--tokenizer", tokenizer,
            "--dataset-name", "sharegpt", "--dataset-path", str(prompts), "--sharegpt-output-len",
            str(args.output_len), "--num-prompts", str(requests), "--max-concurrency", str(concurrency),
            "--temperature", "0", "--seed", str(args.seed), "--percentile-metrics",
            "ttft,tpot,itl,e2el", "--goodput", f"tpot:{args.tpot_slo_ms}",
        ]
        out = workdir / f"{setup.replace(' ', '_').replace(',', '')}-{concurrency}.json"
        result = run_vllm_bench(gateway_url, bench_args, out, None)
        rows.append({"setup": setup, "concurrency": concurrency, **result})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--tpot-slo-ms", type=float, default=150.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "spec-pool.md")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="specgate-spec-pool-"))
    most = max(max(args.min_requests, c * args.requests_per_stream) for c in args.concurrency)
    prompts = build_prompts(workdir / "prompts.json", most + 8, args.seed)
    rows: list[dict[str, Any]] = []
    mixed: list[tuple[str, str]] = []
    for setup, profiles, policy in SETUPS:
        if profiles == MIXED:
            mixed.append((setup, policy))
            continue
        with pool(profiles, workdir) as urls, gateway(urls, GATEWAY_PORTS[0], None, workdir) as url:
            rows += measure(url, setup, args, prompts, workdir)
    # The mixed pool once, for both policies: the same two workers, two gateways measured in turn.
    with pool(MIXED, workdir) as urls:
        for (setup, policy), port in zip(mixed, GATEWAY_PORTS, strict=True):
            with gateway(urls, port, None, workdir, extra=["--routing", policy]) as url:
                rows += measure(url, setup, args, prompts, workdir)
                advice = _admin(url) if policy == "spec_aware" else None
    command = "python -m benchmarks.bench_spec_pool " + " ".join(sys.argv[1:] if argv is None else argv)
    (workdir / "rows.json").write_text(json.dumps(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(rows, command, args, advice))
    plot(rows, args.output.with_suffix(".png"))
    print(args.output.read_text())
    return 0


def _admin(url: str) -> Any:
    import httpx

    return httpx.get(url + "/admin/speculation", timeout=10).json()


def render(rows: list[dict[str, Any]], command: str, args: argparse.Namespace, advice: Any) -> str:
    lines = [
        "# A pool of two workers: speculating, not, or one of each under least_loaded and spec_aware\n",
        f"Command: `{command.strip()}`\n",
        f"Greedy answers to held-out chat prompts through the gateway, ending naturally within {args.output_len} "
        f"tokens; goodput counts requests with TPOT ≤ {args.tpot_slo_ms:g} ms. SmolLM2-135M-Instruct "
        f"({SPECULATING}: with its EAGLE-3 draft, k=3; {PLAIN}: alone), each worker on its own core.\n",
        "| set-up | concurrency | output tok/s | goodput (req/s) | mean TPOT (ms) | median TPOT (ms) | "
        "mean TTFT (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setup']} | {row['concurrency']} | {float(row['output_throughput']):.1f} | "
            f"{float(row.get('request_goodput') or 0):.2f} | {float(row['mean_tpot_ms']):.2f} | "
            f"{float(row['median_tpot_ms']):.2f} | {float(row['mean_ttft_ms']):.1f} |"
        )
    if advice is not None:
        lines += ["", "`GET /admin/speculation` of the spec_aware gateway at the end:", "", "```json",
                  json.dumps(advice, indent=2), "```"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from loadtest.report import _pyplot

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for setup, _, _ in SETUPS:
        mine = sorted((r for r in rows if r["setup"] == setup), key=lambda r: int(r["concurrency"]))
        levels = [int(r["concurrency"]) for r in mine]
        left.plot(levels, [float(r["mean_tpot_ms"]) for r in mine], marker="o", label=setup)
        right.plot(levels, [float(r.get("request_goodput") or 0) for r in mine], marker="o", label=setup)
    for axis, title in ((left, "mean TPOT ms (lower is better)"), (right, "goodput req/s (higher is better)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
