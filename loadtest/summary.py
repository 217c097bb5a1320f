"""Load generator statistics: percentiles, throughput, goodput and error counts, computed as vllm bench does."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from loadtest.records import CANCELLED, RequestResult

# SLO names accepted for goodput, as in vllm bench (e2el is its name for e2e).
SLO_NAMES = ("ttft", "tpot", "e2e")


def distribution(values_s: Iterable[float], percentiles: Sequence[float]) -> dict[str, float | int | None]:
    """mean/std/min/max and percentiles in milliseconds; numpy's linear interpolation, like vllm bench."""
    values = np.fromiter(values_s, dtype=float) * 1000.0
    if values.size == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None,
                **{_pkey(p): None for p in percentiles}}
    stats: dict[str, float | int | None] = {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }
    for p, value in zip(percentiles, np.percentile(values, list(percentiles)), strict=True):
        stats[_pkey(p)] = float(value)
    return stats


def _pkey(p: float) -> str:
    return f"p{p:g}"


def per_token_gaps(record: RequestResult) -> list[float]:
    """The gateway's TBT: the gap between successive events that carry tokens ÷ the tokens in the later one.
    Events without tokens (a chat's role-only first event) start no gap. Needs continuous usage stats."""
    tokens = record.chunk_tokens
    if len(tokens) != len(record.itl_s) + 1:
        return []
    gaps: list[float] = []
    since_tokens = 0.0 if tokens[0] > 0 else None  # time since the last event with tokens, once there is one
    for gap, count in zip(record.itl_s, tokens[1:], strict=True):
        if since_tokens is not None:
            since_tokens += gap
        if count > 0:
            if since_tokens is not None:
                gaps.extend([since_tokens / count] * count)
            since_tokens = 0.0
    return gaps


def summarize(
    records: Sequence[RequestResult], duration_s: float, *, slos_s: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = (50.0, 90.0, 99.0), rate_window_s: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Latencies over the measured requests (ramp-up ones left out); rates over `duration_s`, or, with
    `rate_window_s` (start, end in run time), over what arrived inside that window from every request."""
    all_records = records
    ramp_up = sum(r.ramp_up for r in records)
    records = [r for r in records if not r.ramp_up]
    ok = [r for r in records if r.ok]
    kinds = Counter(r.kind for r in records if not r.ok)
    cancelled = kinds.get(CANCELLED, 0)
    duration_s = max(duration_s, 1e-9)
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    chunk_tokens = [t for r in ok for t in r.chunk_tokens if t > 0]
    events = sum(len(r.itl_s) + 1 for r in ok)
    summary: dict[str, Any] = {
        "duration_s": duration_s,
        "requests": {"total": len(records), "completed": len(ok), "failed": len(records) - len(ok) - cancelled,
                     "cancelled": cancelled, "ramp_up": ramp_up},
        "errors": dict(sorted(kinds.items())),
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        # Events with choices per second: the SSE rate a relay in the path has to sustain.
        "event_throughput": events / duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "ttft_ms": distribution((r.ttft_s for r in ok if r.ttft_s is not None), percentiles),
        "tpot_ms": distribution((t for r in ok if (t := r.tpot_s) is not None), percentiles),
        "itl_ms": distribution((gap for r in ok for gap in r.itl_s), percentiles),
        "e2e_ms": distribution((r.latency_s for r in ok if r.latency_s is not None), percentiles),
        "tbt_ms": distribution((gap for r in ok for gap in per_token_gaps(r)), percentiles),
        "queue_ms": distribution((r.queue_s for r in records), percentiles),
        "tokens_per_chunk": {
            "mean": float(np.mean(chunk_tokens)) if chunk_tokens else None,
            "max": max(chunk_tokens) if chunk_tokens else None,
        },
        "events_per_request": float(np.mean([len(r.itl_s) + 1 for r in ok])) if ok else None,
        "missing_done": sum(1 for r in ok if not r.saw_done),
        "tokens_estimated": sum(1 for r in ok if r.tokens_estimated),
    }
    if slos_s:
        summary["goodput"] = _goodput(slos_s, sum(1 for r in ok if _meets(r, slos_s)), duration_s)
    if rate_window_s is not None:
        summary.update(_window_rates(all_records, rate_window_s, slos_s))
    return summary


def _window_rates(
    records: Sequence[RequestResult], window_s: tuple[float, float], slos_s: Mapping[str, float] | None,
) -> dict[str, Any]:
    """Rates from the events and completions that fell inside the window, whichever request they belong to.

    After a ramp-up, each stream is still busy with its first (unmeasured) request for a while: counting only
    measured requests over the window would leave that time empty and understate every rate.
    """
    start, end = window_s
    seconds = max(end - start, 1e-9)
    events = completed = good = 0
    output_tokens = input_tokens = 0.0
    for record in records:
        if not record.ok or record.ttft_s is None:
            continue
        arrivals = list(itertools.accumulate(record.itl_s, initial=record.start_s + record.ttft_s))
        exact = len(record.chunk_tokens) == len(arrivals)
        for index, arrived in enumerate(arrivals):
            if start <= arrived <= end:
                events += 1
                output_tokens += record.chunk_tokens[index] if exact else record.output_tokens / len(arrivals)
        if record.latency_s is not None and start <= record.start_s + record.latency_s <= end:
            completed += 1
            input_tokens += record.prompt_tokens or 0
            if slos_s and _meets(record, slos_s):
                good += 1
    rates: dict[str, Any] = {
        "rate_window_s": [start, end],
        "request_throughput": completed / seconds,
        "output_throughput": output_tokens / seconds,
        "total_token_throughput": (input_tokens + output_tokens) / seconds,
        "event_throughput": events / seconds,
    }
    if slos_s:
        rates["goodput"] = _goodput(slos_s, good, seconds)
    return rates


def _goodput(slos_s: Mapping[str, float], good: int, seconds: float) -> dict[str, Any]:
    return {
        "slos_ms": {name: limit * 1000.0 for name, limit in slos_s.items()},
        "good_requests": good,
        "request_goodput": good / seconds,
    }


def _meets(record: RequestResult, slos_s: Mapping[str, float]) -> bool:
    # vllm bench counts a request's TPOT as 0 when it produced a single token.
    values = {"ttft": record.ttft_s, "tpot": record.tpot_s or 0.0, "e2e": record.latency_s}
    return all((values[name] or 0.0) <= limit for name, limit in slos_s.items())
