"""Benchmark: SmolLM2-135M-Instruct with its EAGLE-3 draft, with n-gram speculation, and without, in one run.

    python -m benchmarks.bench_speculation --concurrency 1 4 16 64

For each profile a worker starts on core 0 and the gateway on core 1; `vllm bench serve` sends greedy chat
prompts the draft was never trained on (engine/smollm2/prompts.py, held-out subjects) through the gateway,
answers ending naturally (at most --output-len tokens). Acceptance comes from the worker's own
vllm:spec_decode_* counters, read before and after each level. The answers at concurrency 1 are compared
across profiles: speculation must not change a greedy answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, gateway, run_vllm_bench, scrape, worker
from engine.demo_models import default_models_dir
from engine.smollm2.prompts import held_out_prompts
from engine.smollm2.target import TARGET_DIR

BASELINE = "cpu-smollm2"
PROFILES = (BASELINE, "cpu-smollm2-eagle3", "cpu-smollm2-ngram")
SPEC_COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts_total",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted": "vllm:spec_decode_num_accepted_tokens_total",
}
PER_POSITION = re.compile(r'^vllm:spec_decode_num_accepted_tokens_per_pos_total\{[^}]*position="(\d+)"[^}]*\} (\S+)$')


def build_prompts(path: Path, count: int, seed: int) -> Path:
    """A ShareGPT-shaped file of held-out chat prompts (the answer field is unused: --sharegpt-output-len)."""
    entries = [{"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "-"}]}
               for prompt in held_out_prompts(count, seed)]
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
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-level", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "speculation.md")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="specgate-spec-"))
    prompts = build_prompts(workdir / "prompts.json", max(args.requests_per_level), args.seed)
    tokenizer = str(default_models_dir() / TARGET_DIR)
    rows: list[dict[str, Any]] = []
    answers: dict[str, list[str]] = {}
    for profile in args.profiles:
        with contextlib.ExitStack() as stack:
            worker_url = stack.enter_context(worker(profile, 8290, "0", workdir))
            gateway_url = stack.enter_context(gateway([worker_url], 8291, 1, workdir))
            for concurrency, requests in zip(args.concurrency, args.requests_per_level, strict=True):
                bench_args = [
                    "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--model", "smollm2",
                    "--tokenizer", tokenizer, "--dataset-name", "sharegpt", "--dataset-path", str(prompts),
                    "--sharegpt-output-len", str(args.output_len), "--num-prompts", str(requests),
                    "--max-concurrency", str(concurrency), "--temperature", "0", "--save-detailed",
                    "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
                ]
                before = spec_counters(worker_url)
                result: dict[str, Any] = run_vllm_bench(gateway_url, bench_args,
                                                        workdir / f"{profile}-{concurrency}.json", 1)
                after = spec_counters(worker_url)
                if concurrency == 1:
                    answers[profile] = list(result.get("generated_texts", []))
                summary = {key: value for key, value in result.items() if not isinstance(value, list)}
                rows.append({"profile": profile, "concurrency": concurrency, **summary, **acceptance(before, after)})
    identical = {profile: answers[profile] == answers.get(args.profiles[0]) for profile in answers}
    command = "python -m benchmarks.bench_speculation " + " ".join(sys.argv[1:] if argv is None else argv)
    report = render_report(rows, command, identical, len(answers.get(args.profiles[0], [])))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    plot(rows, args.output.with_suffix(".png"))
    print("\n" + report)
    return 0


def render_report(rows: list[dict[str, Any]], command: str, identical: dict[str, bool], answers: int) -> str:
    baseline = {int(row["concurrency"]): float(row["output_throughput"]) for row in rows
                if row["profile"] == rows[0]["profile"]}
    lines = [
        "# Speculative decoding on the CPU engine: SmolLM2-135M-Instruct with and without speculation\n",
        f"Command: `{command.strip()}`\n",
        "Greedy chat answers to held-out prompts through the gateway (each ends naturally, at most the output "
        "length); worker on core 0, gateway and client on core 1. `vs base` is output tok/s over "
        f"{rows[0]['profile']}'s at the same concurrency.\n",
        "Greedy answers at concurrency 1 identical to the first profile's ("
        + ", ".join(f"{profile}: {'yes' if same else 'NO'}" for profile, same in identical.items())
        + f"; {answers} answers each).\n",
        "| profile | concurrency | output tok/s | vs base | mean TTFT (ms) | mean TPOT (ms) | median TPOT (ms) | "
        "mean ITL (ms) | acceptance rate | mean acceptance length | per-position acceptance |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        positions = ", ".join(f"{float(row[k]):.2f}" for k in sorted(row) if str(k).startswith("accept_pos"))
        rate = f"{float(row['acceptance_rate']):.3f}" if "acceptance_rate" in row else "-"
        length = f"{float(row['mean_acceptance_length']):.2f}" if "mean_acceptance_length" in row else "-"
        ratio = float(row["output_throughput"]) / baseline[int(row["concurrency"])]
        lines.append(
            f"| {row['profile']} | {row['concurrency']} | {float(row['output_throughput']):.1f} | {ratio:.2f}x | "
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
    profiles = list(dict.fromkeys(str(row["profile"]) for row in rows))
    width = 0.8 / len(profiles)
    for index, profile in enumerate(profiles):
        offset = (index - (len(profiles) - 1) / 2) * width
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
