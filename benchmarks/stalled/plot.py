"""The PNG beside the report: RSS, kernel send queue, held sockets and the engine's running requests over time,
stalled readers against live ones, with the stall and the send timeout marked."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.stalled.figures import GOAL_KIB_PER_STREAM
from benchmarks.stalled.phases import PhaseResult
from benchmarks.stalled.sampling import Sample
from loadtest.report import _pyplot


def plot(stalled: PhaseResult, live: PhaseResult | None, args: argparse.Namespace, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    series = [(stalled, "stalled", "tab:red")] + ([(live, "live", "tab:blue")] if live else [])
    panels: list[tuple[Any, str, Callable[[PhaseResult, Sample], float]]] = [
        (axes[0][0], "gateway RSS − baseline (MiB)", lambda r, s: (s.rss_kib - r.baseline_kib) / 1024),
        (axes[0][1], "kernel send queue to the clients (MiB)", lambda r, s: s.send_queue / 2**20),
        (axes[1][0], "client sockets the gateway holds", lambda r, s: s.held),
        (axes[1][1], "engine running requests", lambda r, s: s.engine_running),
    ]
    for axis, title, value in panels:
        for result, label, color in series:
            axis.plot([s.t for s in result.samples], [value(result, s) for s in result.samples], color=color,
                      label=label)
        axis.set_title(title, fontsize=10)
        if stalled.t_stall is not None:
            axis.axvline(stalled.t_stall, color="grey", linestyle=":", label="last stream stalled")
            axis.axvline(stalled.t_stall + args.send_timeout_s, color="black", linestyle="--",
                         label="+ send timeout")
    axes[0][0].axhline(GOAL_KIB_PER_STREAM * args.streams / 1024, color="green", linestyle=":",
                       label=f"goal: {GOAL_KIB_PER_STREAM:g} KiB x {args.streams}")
    orphaned: list[tuple[Any, str, Callable[[Sample], float]]] = [
        (axes[0][1], "stalled: of it, orphaned (no fd)", lambda s: s.orphan_queue / 2**20),
        (axes[1][0], "stalled: orphaned kernel sockets", lambda s: s.orphans),
    ]
    for axis, label, orphan_value in orphaned:
        axis.plot([s.t for s in stalled.samples], [orphan_value(s) for s in stalled.samples], color="tab:orange",
                  linestyle="--", label=label)
    for axis in axes[1]:
        axis.set_xlabel("seconds since the streams opened")
    for axis in axes.flat:
        axis.legend(fontsize=7)
    fig.suptitle(f"{args.streams} clients that stop reading vs {args.streams} that read "
                 f"(send timeout {args.send_timeout_s:g} s)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
