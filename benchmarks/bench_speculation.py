"""Benchmark: speculative decoding (cpu-demo) against none (cpu-baseline), through the gateway, in one run.

    python -m benchmarks.bench_speculation --concurrency 1 32

For each profile a worker starts on core 0 and the gateway on core 1; `vllm bench serve` sends greedy
code-continuation prompts (Python test-suite sources, which the demo models were not trained on) through
the gateway. Acceptance comes from the worker's own vllm:spec_decode_* counters, read before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, gateway, run_vllm_bench, scrape, worker
from engine.demo_models import default_models_dir

PROFILES = ("cpu-baseline", "cpu-demo")
SPEC_COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts_total",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted": "vllm:spec_decode_num_accepted_tokens_total",
}
PER_POSITION = re.compile(r'^vllm:spec_decode_num_accepted_tokens_per_pos_total\{[^}]*position="(\d+)"[^}]*\} (\S+)$')


def build_prompts(path: Path, count: int, seed: int) -> Path:
    """A ShareGPT-shaped file of code prefixes from the standard library's tests (unseen in training)."""
    tests = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("test/test_*.py"))
    rng = random.Random(seed)
    entries = []
    while len(entries) < count:
        lines = rng.choice(tests).read_text(errors="replace").splitlines()
        if len(lines) < 40:
            continue
        start = rng.randrange(0, len(lines) - 30)
        prompt = "\n".join(lines[start : start + 12])
        answer = "\n".join(lines[start + 12 : start + 30])
        if len(prompt) > 200 and len(answer) > 100:
            entries.append({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
    path.write_text(json.dumps(entries))
    return path


def spec_counters(worker_url: str) -> dict[str, float]:
    values: dict[str, float] = dict.fromkeys(SPEC_COUNTERS, 0.0)
    for line in scrape(worker_url).splitlines():
        for key, name in SPEC_COUNTERS.items():
            if line.startswith(name + "{") or line.startswith(name + " "):
                values[key] += float(line.rsplit(" ", 1)[1])
        match = PER_POSITION.match(line)
        if match:
            key = f"pos{match.group(1)}"
            values[key] = values.get(key, 0.0) + float(match.group(2))
    return values


def acceptance(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    drafts = delta.get("drafts", 0.0)
    if not drafts:
        return {}
    result = {
        "acceptance_rate": delta["accepted"] / delta["draft_tokens"],
        "mean_acceptance_length": 1 + delta["accepted"] / drafts,
    }
    for key in sorted(k for k in delta if k.startswith("pos")):
        result[f"accept_{key}"] = delta[key] / drafts
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests-per-level", type=int, nargs="+", default=[24, 160])
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "speculation.md")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="specgate-spec-"))
    prompts = build_prompts(workdir / "prompts.json", max(args.requests_per_level) + 8, args.seed)
    tokenizer = str(default_models_dir() / "demo-target")
    rows: list[dict[str, Any]] = []
    for profile in PROFILES:
        with contextlib.ExitStack() as stack:
            worker_url = stack.enter_context(worker(profile, 8290, "0", workdir))
            gateway_url = stack.enter_context(gateway([worker_url], 8291, 1, workdir))
            for concurrency, requests in zip(args.concurrency, args.requests_per_level, strict=True):
                bench_args = [
                    "--backend", "openai", "--endpoint", "/v1/completions", "--model", "demo",
                    "--tokenizer", tokenizer, "--dataset-name", "sharegpt", "--dataset-path", str(prompts),
                    "--sharegpt-output-len", str(args.output_len), "--num-prompts", str(requests),
                    "--max-concurrency", str(concurrency), "--temperature", "0", "--ignore-eos",
                    "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
                ]
                before = spec_counters(worker_url)
                result = run_vllm_bench(gateway_url, bench_args, workdir / f"{profile}-{concurrency}.json", 1)
                after = spec_counters(worker_url)
                rows.append({"profile": profile, "concurrency": concurrency, **result, **acceptance(before, after)})
    command = "python -m benchmarks.bench_speculation " + " ".join(sys.argv[1:] if argv is None else argv)
    report = render_report(rows, command)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    plot(rows, args.output.with_suffix(".png"))
    print("\n" + report)
    return 0


def render_report(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Speculative decoding on the CPU engine: cpu-demo (draft, k=3) vs cpu-baseline\n",
        f"Command: `{command.strip()}`\n",
        "Greedy completions of Python test-suite code through the gateway, 64 output tokens each.\n",
        "| profile | concurrency | output tok/s | mean TTFT (ms) | mean TPOT (ms) | median TPOT (ms) | "
        "mean ITL (ms) | acceptance rate | mean acceptance length | per-position acceptance |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        positions = ", ".join(f"{float(row[k]):.2f}" for k in sorted(row) if str(k).startswith("accept_pos"))
        rate = f"{float(row['acceptance_rate']):.3f}" if "acceptance_rate" in row else "-"
        length = f"{float(row['mean_acceptance_length']):.2f}" if "mean_acceptance_length" in row else "-"
        lines.append(
            f"| {row['profile']} | {row['concurrency']} | {float(row['output_throughput']):.1f} | "
            f"{float(row['mean_ttft_ms']):.1f} | "
            f"{float(row['mean_tpot_ms']):.2f} | {float(row['median_tpot_ms']):.2f} | "
            f"{float(row['mean_itl_ms']):.2f} | {rate} | {length} | {positions or '-'} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({int(row["concurrency"]) for row in rows})
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for offset, profile in ((-width / 2, "cpu-baseline"), (width / 2, "cpu-demo")):
        mine = {int(r["concurrency"]): r for r in rows if r["profile"] == profile}
        xs = [i + offset for i in range(len(levels))]
        left.bar(xs, [float(mine[c]["output_throughput"]) for c in levels], width, label=profile)
        right.bar(xs, [float(mine[c]["mean_tpot_ms"]) for c in levels], width, label=profile)
    for axis, title in ((left, "output tokens/s (higher is better)"), (right, "mean TPOT ms (lower is better)")):
        axis.set_xticks(range(len(levels)), [f"concurrency {c}" for c in levels])
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
