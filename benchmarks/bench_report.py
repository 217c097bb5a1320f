"""Report of the gateway benchmark: Markdown tables, the issue's goals, a combined JSON and PNG plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from benchmarks.bench_goals import goal_lines
from benchmarks.bench_phases import capacity_verdicts

PHASE_FILES = ("latency", "burst", "chunks", "capacity", "idle")


def load_phases(out_dir: Path) -> dict[str, dict[str, Any]]:
    return {phase: orjson.loads((out_dir / f"{phase}.json").read_bytes())
            for phase in PHASE_FILES if (out_dir / f"{phase}.json").exists()}


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def direct_of(rows: Sequence[dict[str, Any]], level: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["target"] == "direct" and r["level"] == level), None)


def added(row: dict[str, Any], base: dict[str, Any] | None, key: str, p: str) -> float | None:
    if base is None or row[key][p] is None or base[key][p] is None:
        return None
    return float(row[key][p] - base[key][p])


def ratio(row: dict[str, Any], base: dict[str, Any] | None, key: str, p: str) -> float | None:
    if base is None or not row[key][p] or not base[key][p]:
        return None
    return float(row[key][p] / base[key][p])


def one_to_one(row: dict[str, Any]) -> str:
    same = row["client_events"] == round(row["engine_events"]) and row["client_tokens"] == round(row["engine_tokens"])
    return "yes" if same else "**no**"


def latency_tables(rows: Sequence[dict[str, Any]]) -> list[str]:
    head = ("| streams | target | TTFT p50 | TTFT p99 | added TTFT p50 | added TTFT p99 | TPOT p50 | TPOT ratio p50 "
            "| TPOT ratio mean | ITL p99 | events/s |")
    lines = ["Latency (ms; added = target − direct at the same level; ratios vs direct):", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        base = direct_of(rows, row["level"])
        lines.append("| " + " | ".join([
            str(row["level"]), row["target"], _f(row["ttft_ms"]["p50"]), _f(row["ttft_ms"]["p99"]),
            _f(added(row, base, "ttft_ms", "p50")), _f(added(row, base, "ttft_ms", "p99")),
            _f(row["tpot_ms"]["p50"]), _f(ratio(row, base, "tpot_ms", "p50"), 3),
            _f(ratio(row, base, "tpot_ms", "mean"), 3), _f(row["itl_ms"]["p99"]), _f(row["event_throughput"], 0),
        ]) + " |")
    lines += round_table(rows)
    head2 = ("| streams | target | requests ok/sent | errors | events client / engine | tokens client / engine "
             "| 1:1 | gateway CPU | µs/event | RSS idle → peak MiB | core-1 busy |")
    lines += ["", "Delivery and resources (events = SSE events with choices; gateway CPU = share of its core):", "",
              head2, "|" + "---|" * (head2.count("|") - 1)]
    for row in rows:
        errors = ", ".join(f"{k} {v}" for k, v in row["errors"].items()) or "0"
        gateway = row["target"] != "direct"
        lines.append("| " + " | ".join([
            str(row["level"]), row["target"], f"{row['requests']['completed']}/{row['requests']['total']}", errors,
            f"{row['client_events']:,} / {row['engine_events']:,.0f}",
            f"{row['client_tokens']:,} / {row['engine_tokens']:,.0f}", one_to_one(row),
            f"{row['target_cpu_share']:.0%}" if gateway else "–",
            _f(row["target_us_per_event"], 1) if gateway else "–",
            f"{row['rss_idle_mib']:.0f} → {row['rss_peak_mib']:.0f}" if gateway else "–",
            f"{row['core1_busy']:.0%}",
        ]) + " |")
    return lines


def added_by_round(row: dict[str, Any], base: dict[str, Any] | None, p: str) -> list[float]:
    """Each round's added TTFT percentile: the target's round k against direct's round k, run minutes apart
    in the same interleaved sweep. Empty when the rounds do not pair up (older phase files have none)."""
    key = f"ttft_{p}_by_round"
    mine, theirs = row.get(key) or [], (base or {}).get(key) or []
    if not mine or len(mine) != len(theirs):
        return []
    return [a - b for a, b in zip(mine, theirs, strict=True) if not (math.isnan(a) or math.isnan(b))]


def round_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Added TTFT round by round, and its median over the rounds: a round the VM's host slowed moves the
    pooled percentiles of whichever target it hit, and moves this median only if it hit most rounds."""
    body = []
    for row in rows:
        if row["target"] == "direct":
            continue
        base = direct_of(rows, row["level"])
        p50s, p99s = added_by_round(row, base, "p50"), added_by_round(row, base, "p99")
        if not p50s or not p99s:
            continue
        body.append("| " + " | ".join([
            str(row["level"]), row["target"], ", ".join(f"{v:+.2f}" for v in p50s),
            f"{statistics.median(p50s):+.2f}", ", ".join(f"{v:+.1f}" for v in p99s), f"{statistics.median(p99s):+.1f}",
        ]) + " |")
    if not body:
        return []
    head = "| streams | target | added p50 per round | median | added p99 per round | median |"
    return ["", "Added TTFT round by round (ms; each round against direct's same round) and its median over the "
            "rounds, which one disturbed round does not move:", "", head, "|" + "---|" * (head.count("|") - 1),
            *body]


def capacity_tables(rows: Sequence[dict[str, Any]]) -> list[str]:
    head = ("| streams | target | events/s | TTFT p50 | TTFT p99 | limit (2x direct p99) | within | errors "
            "| gateway CPU | µs/event |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        gateway = row["target"] != "direct"
        lines.append("| " + " | ".join([
            str(row["level"]), row["target"], _f(row["event_throughput"], 0), _f(row["ttft_ms"]["p50"]),
            _f(row["ttft_ms"]["p99"]), _f(row["ttft_limit_ms"]) if gateway else "–",
            ("yes" if row["within_limit"] else "**no**") if gateway else "–",
            ", ".join(f"{k} {v}" for k, v in row["errors"].items()) or "0",
            f"{row['target_cpu_share']:.0%}" if gateway else "–",
            _f(row["target_us_per_event"], 1) if gateway else "–",
        ]) + " |")
    lines += ["", "| target | max events/s before TTFT p99 > 2x direct | at streams | first level over | "
              "µs/event there | events/s per core at that cost |", "|---|---|---|---|---|---|"]
    for name, verdict in capacity_verdicts(rows).items():
        if name == "direct":
            continue
        us = verdict["us_per_event"]
        lines.append(f"| {name} | {_f(verdict['events_per_s'], 0)} | {_f(verdict['level'])} | "
                     f"{_f(verdict['stopped_at']) if verdict['stopped_at'] else 'none (sweep ended)'} | "
                     f"{_f(us, 1)} | {_f(1e6 / us, 0) if us else '–'} |")
    return lines


def idle_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| target | streams opened | RSS before MiB | RSS with them open MiB | per open stream KiB | "
             "RSS after closing MiB |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['target']} | {row['opened']}/{row['streams']} | {_f(row['before_mib'], 1)} | "
                     f"{_f(row['open_mib'], 1)} | {_f(row['per_stream_kib'], 1)} | {_f(row['after_mib'], 1)} |")
    return lines


def _steal(data: dict[str, Any]) -> str:
    steals = [s for s in data.get("host_steals", [data.get("host_steal")]) if s is not None]
    if not steals:
        return ""
    return f"CPU time taken by the VM host (steal) during each run: {', '.join(f'{s:.1%}' for s in steals)}; "


def _setup(data: dict[str, Any]) -> str:
    notes = "; ".join(data["notes"]) or "–"
    loads = data.get("runs", [data["load"]])
    ramp = data.get("ramp_up_s") or 0.0
    ramped = sum(row["requests"].get("ramp_up", 0) for row in data["rows"] if isinstance(row.get("requests"), dict))
    spread = (f"streams started evenly over {ramp:g} s per round, the {ramped:,} requests of the ramp-up (sent "
              "meanwhile, and each stream's first) delivered and counted for 1:1 and errors but not in the latencies; ")
    starts = spread if ramp else (
        "streams started all at once; " if data["phase"] in ("latency", "burst", "chunks") else "")
    return (f"{starts}engine `specgate fake-engine {' '.join(data['engine_args'])}`; "
            f"gateway on core {data['gateway_cpu']}, "
            f"engine + load generator on core {data['client_cpu']}; load average (1/5/15 min) at the end of each "
            f"run: {'; '.join('/'.join(f'{v:g}' for v in load) for load in loads)}; "
            f"{_steal(data)}versions: {notes}; "
            f"took {data['duration_s']:.0f} s")


def markdown(phases: dict[str, dict[str, Any]], title: str, plots: Sequence[Path]) -> str:
    lines = [f"# {title}", "", "Commands (each run under `flock /tmp/specgate-heavy.lock`):", "", "```"]
    lines += sorted({command for data in phases.values() for command in data.get("commands", [data["command"]])})
    lines += ["```", ""]
    skipped = sorted({note for data in phases.values() for note in data["skipped"]})
    lines += [f"- {note}" for note in skipped] + ([""] if skipped else [])
    lines += ["TTFT, TPOT and ITL are `vllm bench serve`'s definitions, from `specgate loadtest`'s client "
              "(loadtest/wire_client.py, each read timed in its read callback); percentiles pool every round's "
              "requests. Rounds are interleaved: per level, each round runs every target in turn.", ""]
    sections = (("latency", "## Latency at GPU-like timing, steady state", latency_tables),
                ("burst", "## Latency when every stream starts at once (bursts)", latency_tables),
                ("chunks", "## 4 tokens per event (speculative decoding)", latency_tables),
                ("capacity", "## Max SSE events/s per core", capacity_tables),
                ("idle", "## Memory at idle open streams", idle_table))
    for phase, heading, render in sections:
        if phase in phases:
            data = phases[phase]
            lines += [heading, "", _setup(data), "", *render(data["rows"]), ""]
    goals = goal_lines(phases)
    if goals:
        lines += ["## Goals (issue 5)", "", *goals, ""]
    if plots:
        lines += ["## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    return "\n".join(lines)


def write_report(out_dir: Path, report: Path, *, title: str, plots: bool = True) -> list[Path]:
    """Rebuild the Markdown report (and plots, and a combined JSON beside it) from the phase files."""
    phases = load_phases(out_dir)
    report.parent.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    if plots:
        from benchmarks.bench_plots import plot_added_ttft, plot_capacity

        if "latency" in phases:
            pngs.append(plot_added_ttft(phases["latency"]["rows"], report.with_name(report.stem + "-added-ttft.png")))
        if "capacity" in phases:
            pngs.append(plot_capacity(phases["capacity"]["rows"], report.with_name(report.stem + "-capacity.png")))
    # A hand-written "## Analysis" section at the end of an earlier report survives the rebuild.
    kept = ""
    if report.exists() and (at := report.read_text().find("\n## Analysis")) >= 0:
        kept = report.read_text()[at:]
    report.write_text(markdown(phases, title, pngs).rstrip("\n") + "\n" + kept)
    combined = report.with_suffix(".json")
    combined.write_bytes(orjson.dumps(phases, option=orjson.OPT_INDENT_2))
    return [report, combined, *pngs]
