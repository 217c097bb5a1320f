"""Figures drawn from a phase's readings: peak RSS per stream, rates over a window, the engine's events per
stream, and the live readers' fixed and per-event memory."""

from __future__ import annotations

import statistics

from benchmarks.stalled.phases import PhaseResult
from benchmarks.stalled.sampling import Sample

GOAL_KIB_PER_STREAM = 64.0  # gateway memory per stalled reader beyond the kernel's buffers

def peak_per_stream_kib(result: PhaseResult) -> float:
    """Peak RSS over the baseline, per stream (KiB)."""
    return max(s.rss_kib - result.baseline_kib for s in result.samples) / result.streams


def rate_per_s(result: PhaseResult, attr: str, since: float) -> float:
    """How fast a reading's attribute changed per second from `since` to the last reading."""
    window = [s for s in result.samples if s.t >= since]
    if len(window) < 2 or window[-1].t <= window[0].t:
        return 0.0
    return float(getattr(window[-1], attr) - getattr(window[0], attr)) / (window[-1].t - window[0].t)


def at(result: PhaseResult, t: float) -> Sample:
    """The last reading at or before t."""
    return [s for s in result.samples if s.t <= t + 1e-9][-1] if result.samples[0].t <= t else result.samples[0]


def engine_events_per_stream(result: PhaseResult) -> float:
    """Events the engine wrote per stream in the phase (to the gateway; for stalled streams, as far as the
    buffers between them let it)."""
    events = [s.engine_events for s in result.samples if s.engine_events == s.engine_events]  # not NaN
    return (max(events) - events[0]) / result.streams if events else 0.0


def rss_bytes_per_event(result: PhaseResult, since: float) -> float | None:
    """RSS growth per event the engine wrote, after `since`: state that grows with a stream's length."""
    window = [s for s in result.samples if s.t >= since]
    if len(window) < 2 or window[-1].engine_events <= window[0].engine_events:
        return None
    return (window[-1].rss_kib - window[0].rss_kib) * 1024 / (window[-1].engine_events - window[0].engine_events)


def live_fit(result: PhaseResult) -> tuple[float, float] | None:
    """Per stream, RSS − baseline (KiB) against the events the engine wrote: (intercept KiB, slope bytes/event).
    The intercept is what a stream holds whatever its length, the slope what it adds per event relayed."""
    points = [s for s in result.samples if s.held == result.streams and s.t <= result.hold_s]
    if len(points) < 3:
        return None
    start = result.samples[0].engine_events
    events = [(s.engine_events - start) / result.streams for s in points]
    rss = [(s.rss_kib - result.baseline_kib) / result.streams for s in points]
    if len(set(events)) < 2:
        return None
    slope, intercept = statistics.linear_regression(events, rss)
    return intercept, slope * 1024


def gateway_cpu_share(result: PhaseResult) -> float:
    """The gateway's CPU time over the hold, as a share of one core."""
    first, last = result.samples[0], result.final or result.samples[-1]
    return (last.gateway_cpu_s - first.gateway_cpu_s) / max(last.t - first.t, 1e-9)
