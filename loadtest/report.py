"""Load generator output: per-request records and summary as JSON, a Markdown table, and PNG plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadtest.runner import RunResult

_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL (chunk gap)"), ("tbt_ms", "TBT (per token)"),
            ("e2e_ms", "E2E"), ("queue_ms", "client queue"))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _pkeys(summary: dict[str, Any]) -> list[str]:
    return [key for key in summary["ttft_ms"] if key.startswith("p")]


def markdown(result: RunResult, command: str = "") -> str:
    summary = result.summary
    pkeys = _pkeys(summary)
    requests = summary["requests"]
    lines = [f"# Load test {result.config.label}".rstrip(), ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"- target: `{result.config.base_url}` endpoint `{result.config.endpoint}` model `{result.config.model}`",
        f"- arrival: {result.config.arrival}, workload: {type(result.config.workload).__name__}",
        f"- requests: {requests['completed']} completed, {requests['failed']} failed, "
        f"{requests['cancelled']} cancelled in {summary['duration_s']:.2f} s",
        f"- throughput: {summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} output tok/s, "
        f"{summary['event_throughput']:.0f} events/s",
        f"- tokens per chunk: mean {_fmt(summary['tokens_per_chunk']['mean'])}, "
        f"events per request: {_fmt(summary['events_per_request'])}",
    ]
    if summary["errors"]:
        lines.append("- errors: " + ", ".join(f"{kind} {count}" for kind, count in summary["errors"].items()))
    if "goodput" in summary:
        goodput = summary["goodput"]
        slos = ", ".join(f"{name} ≤ {limit:g} ms" for name, limit in goodput["slos_ms"].items())
        lines.append(f"- goodput ({slos}): {goodput['good_requests']} requests, {goodput['request_goodput']:.2f} req/s")
    lines += ["", "| metric (ms) | mean | " + " | ".join(pkeys) + " | max | n |",
              "|---|---|" + "---|" * len(pkeys) + "---|---|"]
    for key, name in _METRICS:
        stats = summary[key]
        cells = [_fmt(stats["mean"]), *(_fmt(stats[p]) for p in pkeys), _fmt(stats["max"]), str(stats["count"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_run(result: RunResult, out_dir: Path, *, command: str = "", plots: bool = True) -> list[Path]:
    """summary.json, records.json, summary.md and (with plots) distributions.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"label": result.config.label, "command": command, "started_at": result.started_at,
               "config": result.config.describe(), **result.summary}
    paths = [out_dir / "summary.json", out_dir / "records.json", out_dir / "summary.md"]
    paths[0].write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2, default=str))
    paths[1].write_bytes(orjson.dumps([record.to_dict() for record in result.records]))
    paths[2].write_text(markdown(result, command))
    if plots:
        paths.append(plot_distributions(result, out_dir / "distributions.png"))
    return paths


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on benchmark hosts
    import matplotlib.pyplot as plt

    return plt


def plot_distributions(result: RunResult, path: Path) -> Path:
    plt = _pyplot()
    ok = [r for r in result.records if r.ok and not r.ramp_up]
    series = (("TTFT", [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]),
              ("ITL (gap between chunks)", [gap * 1000 for r in ok for gap in r.itl_s]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (name, values) in zip(axes, series, strict=True):
        axis.set_title(f"{name}, n={len(values)}")
        axis.set_xlabel("ms")
        if values:
            axis.hist(values, bins=60, color="#4477aa")
            for p, style in ((50, "-"), (99, "--")):
                value = float(np.percentile(values, p))  # the summary's definition, so the numbers agree
                axis.axvline(value, color="#cc3311", linestyle=style, label=f"p{p} {value:.2f} ms")
            axis.legend()
    fig.suptitle(result.config.label or "load test")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_sweep(results: Sequence[RunResult], kind: str, out_dir: Path, *, command: str = "",
                plots: bool = True) -> list[Path]:
    """Each level in its own subdirectory, plus sweep.json, sweep.md and sweep.png (latency vs load)."""
    paths: list[Path] = []
    for result in results:
        paths += write_run(result, out_dir / result.config.label.replace("=", "-"), command=command, plots=plots)
    levels = [_level(result, kind) for result in results]
    rows = [{"level": level, **result.summary} for level, result in zip(levels, results, strict=True)]
    (out_dir / "sweep.json").write_bytes(
        orjson.dumps({"kind": kind, "command": command, "levels": rows}, option=orjson.OPT_INDENT_2, default=str))
    pkeys = _pkeys(results[0].summary) if results else []
    head = f"| {kind} | req/s | out tok/s | errors | " + " | ".join(
        f"{m} {p}" for m in ("TTFT", "TPOT", "ITL") for p in pkeys) + " |"
    lines = [f"# Sweep over {kind}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for level, result in zip(levels, results, strict=True):
        s = result.summary
        cells = [f"{level:g}", f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
                 str(sum(s["errors"].values()))]
        cells += [_fmt(s[m][p]) for m in ("ttft_ms", "tpot_ms", "itl_ms") for p in pkeys]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    paths += [out_dir / "sweep.json", out_dir / "sweep.md"]
    if plots and results:
        paths.append(plot_sweep(results, kind, out_dir / "sweep.png"))
    return paths


def _level(result: RunResult, kind: str) -> float:
    return float(result.config.concurrency if kind == "concurrency" else result.config.rate or 0.0)


def plot_sweep(results: Sequence[RunResult], kind: str, path: Path) -> Path:
    plt = _pyplot()
    levels = [_level(result, kind) for result in results]
    xlabel = "concurrent streams" if kind == "concurrency" else "arrival rate (req/s)"
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"))
    for axis, (key, name) in zip(axes.flat, panels, strict=False):
        for p, style in (("p50", "o-"), ("p99", "s--")):
            axis.plot(levels, [r.summary[key].get(p) or float("nan") for r in results], style, label=f"{name} {p}")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("ms")
        axis.set_title(f"{name} vs load")
        axis.legend()
    throughput = axes.flat[3]
    throughput.plot(levels, [r.summary["output_throughput"] for r in results], "o-", label="output tok/s")
    throughput.set_xlabel(xlabel)
    throughput.set_ylabel("tokens/s")
    throughput.set_title("throughput vs load")
    throughput.legend()
    for axis in axes.flat:
        if kind == "concurrency" and len(levels) > 2 and max(levels) / max(min(levels), 1) >= 20:
            axis.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
