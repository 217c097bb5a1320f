"""`specgate ab-report`: compares the versions behind each route from the gateway's request logs and writes
ab-report.md (tables: counts, error rates, TTFT/TPOT/output length with 95 % CIs, pairwise significance tests,
shadow pairs) and ab-report.png (per route: TTFT and TPOT box plots and error-rate bars per version).

Contract: a log line counts when, stripped, it holds a JSON object from its first "{" with at least "time" and
"request_id" (uvicorn's lines and other text are skipped and counted). The window is [--since, --until); times are
ISO 8601 (naive = UTC) or unix seconds. An empty window still writes a report saying so; `run` returns 0 then,
2 when a log cannot be read or scipy/matplotlib are missing. scipy and matplotlib load only when `run` runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.reports.ab_stats import LEVEL, METRICS, Analysis, Entry, Interval, RouteReport, analyse

DEFAULT_OUTPUT_DIR = Path(".cache/ab-report")
# How each metric is shown: the log's unit times this scale, in this unit, to this many decimals.
SCALES = {"TTFT": (1000.0, "ms", 1), "TPOT": (1000.0, "ms", 2), "output tokens": (1.0, "tokens", 1)}


def parse_time(text: str) -> float:
    """Unix seconds from unix seconds or ISO 8601; a time without a zone is UTC."""
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither ISO 8601 nor unix seconds") from None
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time")
    return value


def _alpha(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a significance level in (0, 1)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", dest="logs", action="append", type=Path, required=True, metavar="FILE",
                        help="a gateway request log (repeat for several)")
    parser.add_argument("--since", type=parse_time, metavar="TIME",
                        help="window start, included: ISO 8601 (naive = UTC) or unix seconds")
    parser.add_argument("--until", type=parse_time, metavar="TIME",
                        help="window end, excluded: ISO 8601 (naive = UTC) or unix seconds")
    parser.add_argument("--route", metavar="NAME", help="only this route (its public name)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                        help=f"default {DEFAULT_OUTPUT_DIR}")
    parser.add_argument("--alpha", type=_alpha, default=0.05, help="significance level of the tests (0.05)")


def _number(value: object) -> float | None:
    # bool is an int to Python, never a measurement here.
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_line(line: str, decoder: json.JSONDecoder) -> Entry | None:
    """The request record in one log line, or None for any other line."""
    text = line.strip()
    start = text.find("{")
    if start < 0:
        return None
    try:
        record, _ = decoder.raw_decode(text, start)  # trailing text after the object is allowed
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    when, request_id, status = _number(record.get("time")), _text(record.get("request_id")), record.get("status")
    if when is None or request_id is None or not isinstance(status, str | int) or isinstance(status, bool):
        return None
    tokens = _number(record.get("output_tokens"))
    return Entry(when, request_id, _text(record.get("route")), _text(record.get("served_model")), str(status),
                 _number(record.get("ttft_s")), _number(record.get("tbt_mean_s")),
                 None if tokens is None else int(tokens), _text(record.get("shadow_of")),
                 record.get("greedy") is True, _text(record.get("output_sha256")))


def read_logs(paths: Iterable[Path]) -> tuple[list[Entry], int]:
    """Every request record in the logs, and how many other lines were skipped."""
    decoder = json.JSONDecoder()
    entries: list[Entry] = []
    skipped = 0
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if (entry := parse_line(line, decoder)) is not None:
                    entries.append(entry)
                elif line.strip():
                    skipped += 1
    return entries, skipped


def _when(value: float | None) -> str:
    return "–" if value is None else datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _show(metric: str, value: float | None) -> str:
    scale, _, digits = SCALES[metric]
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def _show_ci(metric: str, value: float | None, ci: Interval | None) -> str:
    if value is None:
        return "n/a"
    return _show(metric, value) + (" (n too small for a CI)" if ci is None else
                                   f" ({_show(metric, ci[0])}–{_show(metric, ci[1])})")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f} %"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _route_section(report: RouteReport, alpha: float) -> list[str]:
    lines = [f"## Route `{report.route}`", ""]
    if report.unserved:
        lines += [f"Requests on this route no version served (refused before a worker): {report.unserved}.", ""]
    lines += _table(("version", "requests", "5xx errors", "error rate (95 % CI)", "4xx (client)"), (
        (f"`{v.version}`", str(v.requests), str(v.errors),
         _percent(v.error_rate) + ("" if (ci := v.error_ci) is None else f" ({_percent(ci[0])}–{_percent(ci[1])})"),
         str(v.client_errors)) for v in report.versions))
    lines += ["", "2xx requests only:", ""]
    lines += _table(("version", "metric", "n", "median (95 % CI)", "mean (95 % CI)"), (
        (f"`{v.version}`", f"{name} ({SCALES[name][1]})", str(s.n), _show_ci(name, s.median, s.median_ci),
         _show_ci(name, s.mean, s.mean_ci)) for v in report.versions for name, s in v.samples.items()))
    if report.tests:
        lines += ["", f"Pairwise differences (α = {alpha:g}; medians, error rates for error rate):", ""]
        lines += _table(("A", "B", "metric", "A", "B", "test", "p-value", "significant"), (
            (f"`{t.a}`", f"`{t.b}`", t.metric,
             *(_percent(x) if t.metric == "error rate" else _show(t.metric, x) for x in (t.a_value, t.b_value)),
             t.test, "n/a" if t.p_value is None else f"{t.p_value:.3g}",
             "n/a" if t.p_value is None else "**yes**" if t.significant(alpha) else "no") for t in report.tests))
    if report.shadows:
        lines += ["", "Shadow pairs (medians primary / shadow; same output: greedy pairs with both outputs hashed):",
                  ""]
        lines += _table(("primary → shadow", "pairs", *(f"{name} ({SCALES[name][1]})" for name in METRICS),
                         "hashed pairs", "same output"), (
            (f"`{s.primary}` → `{s.shadow}`", str(s.pairs),
             *(f"{_show(name, s.medians[name][0])} / {_show(name, s.medians[name][1])}" for name in METRICS),
             str(s.hashed), "n/a" if s.agreement is None else f"{s.agreement:.3g}") for s in report.shadows))
    return [*lines, ""]


def markdown(analysis: Analysis, *, logs: Sequence[Path], records: int, skipped: int, since: float | None,
             until: float | None, route: str | None, alpha: float) -> str:
    lines = ["# A/B report", "",
             f"- logs: {', '.join(f'`{p}`' for p in logs)} ({records} request records, {skipped} other lines skipped)",
             "- window: " + (f"{_when(since)} to {_when(until)} (end excluded)" if since or until else "all lines"),
             f"- route: {route or 'all'}",
             f"- method: medians with a distribution-free order-statistic {LEVEL:.0%} CI (binomial ranks), means "
             "with a Student t CI, error rates with a Wilson CI; Mann–Whitney U (two-sided) for TTFT, TPOT and "
             "output length, a pooled two-proportion z-test (two-sided) for 5xx error rates; p-values are not "
             "corrected for multiple comparisons. Shadow copies are left out of the per-version numbers.", ""]
    if analysis.orphan_shadows:
        lines += [f"{analysis.orphan_shadows} shadow lines in the window have no primary in these logs.", ""]
    if not analysis.routes:
        lines += ["No routed requests in the window" + (f" for route `{route}`." if route else "."), ""]
    for report in analysis.routes:
        lines += _route_section(report, alpha)
    return "\n".join(lines)


def plot(analysis: Analysis, path: Path) -> Path:
    """Per route a row: TTFT and TPOT box plots (2xx) and 5xx error-rate bars with their CIs, per version."""
    importlib.import_module("matplotlib").use("Agg")  # files only; no display where reports run
    plt: Any = importlib.import_module("matplotlib.pyplot")
    rows = max(1, len(analysis.routes))
    fig, axes = plt.subplots(rows, 3, figsize=(14, 3.8 * rows), squeeze=False)
    if not analysis.routes:
        for axis in axes[0]:
            axis.set_axis_off()
        axes[0][1].text(0.5, 0.5, "no routed requests in the window", ha="center", va="center", fontsize=14)
    for (ttft, tpot, errors), report in zip(axes, analysis.routes, strict=False):
        names = [f"{v.version}\nn={v.requests}" for v in report.versions]
        ticks = range(1, len(names) + 1)
        for axis, metric in ((ttft, "TTFT"), (tpot, "TPOT")):
            data = [[x * SCALES[metric][0] for x in v.values[metric]] or [math.nan] for v in report.versions]
            axis.boxplot(data, positions=list(ticks), showfliers=False, widths=0.6)  # outliers would squash the boxes
            axis.set_xticks(list(ticks), names)
            axis.set_title(f"{report.route}: {metric} (2xx, no outliers)")
            axis.set_ylabel(SCALES[metric][1])
            axis.set_ylim(bottom=0)  # from zero, so a gap between versions reads at its true size
        rates = [v.error_rate * 100 for v in report.versions]
        cis = [v.error_ci or (v.error_rate, v.error_rate) for v in report.versions]
        spread = [[max(0.0, r - lo * 100) for r, (lo, _) in zip(rates, cis, strict=True)],
                  [max(0.0, hi * 100 - r) for r, (_, hi) in zip(rates, cis, strict=True)]]
        errors.bar(list(ticks), rates, yerr=spread, capsize=4, color="#cc6677", width=0.6)
        errors.set_xticks(list(ticks), [f"{n}\n{rate:.1f} %" for n, rate in zip(names, rates, strict=True)])
        errors.set_title(f"{report.route}: 5xx error rate ({LEVEL:.0%} CI)")
        errors.set_ylabel("%")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    image_module: Any = importlib.import_module("PIL.Image")
    with image_module.open(path) as image:
        small = image.quantize(64)  # 64 colours, as the repository's other PNGs: a fraction of the bytes
    small.save(path, optimize=True)
    return path


def run(args: argparse.Namespace) -> int:
    try:
        entries, skipped = read_logs(args.logs)
    except OSError as exc:
        print(f"specgate ab-report: {exc}", file=sys.stderr)
        return 2
    try:
        analysis = analyse(entries, args.since, args.until, args.route)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        report = args.output_dir / "ab-report.md"
        report.write_text(markdown(analysis, logs=args.logs, records=len(entries), skipped=skipped, since=args.since,
                                   until=args.until, route=args.route, alpha=args.alpha))
        plot(analysis, args.output_dir / "ab-report.png")
    except ModuleNotFoundError as exc:
        print(f"specgate ab-report: {exc.name} is missing: pip install 'specgate[reports]'", file=sys.stderr)
        return 2
    print(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specgate ab-report", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
