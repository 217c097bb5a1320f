"""Plots of the gateway benchmark: added TTFT vs concurrency, and delivered events/s vs TTFT p99."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.report import _pyplot


def _targets(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        if row["target"] not in names:
            names.append(row["target"])
    return names


def plot_added_ttft(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    direct = {r["level"]: r for r in rows if r["target"] == "direct"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, p in zip(axes, ("p50", "p99"), strict=True):
        for name in _targets(rows):
            if name == "direct":
                continue
            points = [(r["level"], r["ttft_ms"][p] - direct[r["level"]]["ttft_ms"][p]) for r in rows
                      if r["target"] == name and r["level"] in direct and r["ttft_ms"][p] is not None
                      and direct[r["level"]]["ttft_ms"][p] is not None]
            if points:
                axis.plot([x for x, _ in points], [y for _, y in points], "o-", label=name)
        axis.axhline(2.0 if p == "p50" else 5.0, color="grey", linestyle=":", label="goal (≤ 100 streams)")
        axis.set_xscale("log")
        axis.set_yscale("symlog", linthresh=1)
        axis.set_ylim(bottom=-5)  # small negative values are noise around direct
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel("ms over direct")
        axis.set_title(f"added TTFT {p}")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_capacity(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(8, 5))
    for name in _targets(rows):
        mine = [r for r in rows if r["target"] == name and r["ttft_ms"]["p99"] is not None]
        if mine:
            axis.plot([r["event_throughput"] for r in mine], [r["ttft_ms"]["p99"] for r in mine], "o-", label=name)
            for r in mine:
                axis.annotate(str(r["level"]), (r["event_throughput"], r["ttft_ms"]["p99"]), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
    axis.axvline(12_000, color="grey", linestyle=":", label="goal 12,000 events/s")
    axis.set_yscale("log")
    axis.set_xlabel("delivered SSE events/s (gateway on one core)")
    axis.set_ylabel("TTFT p99 (ms)")
    axis.set_title("events/s vs TTFT p99 (labels: concurrent streams)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
