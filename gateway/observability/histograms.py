"""Histograms that take one value many times in one call, for per-token figures.

prometheus_client's Histogram.observe costs one call (a bisect, a lock, two increments) per value: for the
time between tokens, one call per output token of every request. A stream's tokens arrive in chunks whose
tokens share one gap, so `observe(value, times)` counts a whole chunk at once (docs/design/performance.md,
"Batch histograms"). Exposed through the registry's collector API in the same text format, so nothing
downstream tells the two apart.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

# prometheus_client's own `le` formatting (Go's float style), typed: the library leaves it unannotated.
format_bound = cast(Callable[[float], str], floatToGoString)


class Series:
    """One label set's cumulative bucket counts and sum; the gateway's event loop is its only writer."""

    __slots__ = ("_counts", "_upper_bounds", "total")

    def __init__(self, upper_bounds: tuple[float, ...]) -> None:
        self._upper_bounds = upper_bounds
        self._counts = [0] * len(upper_bounds)
        self.total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        # Prometheus buckets are inclusive: the first bound >= value takes it.
        self._counts[bisect.bisect_left(self._upper_bounds, value)] += times
        self.total += value * times

    def observe_each(self, values: Sequence[float]) -> None:
        """Each of `values` once: sorted, a bucket's share is one bisect, so a stream's gaps cost a few bisects
        over the bounds they reach, not a call per gap."""
        ordered = sorted(values)
        left, counts = len(ordered), self._counts
        start = 0
        for index, bound in enumerate(self._upper_bounds):
            if start == left:
                break
            end = bisect.bisect_right(ordered, bound, start)  # the values <= bound: inclusive, as in observe()
            counts[index] += end - start
            start = end
        self.total += sum(ordered)

    def cumulative(self) -> list[tuple[str, float]]:
        running, rows = 0, []
        for bound, count in zip(self._upper_bounds, self._counts, strict=True):
            running += count
            rows.append((format_bound(bound), float(running)))
        return rows


class BatchHistogram(Collector):
    """A labelled histogram family whose series accept `observe(value, times)`."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._upper_bounds = (*sorted(float(b) for b in buckets if not math.isinf(b)), math.inf)
        self._series: dict[tuple[str, ...], Series] = {}
        registry.register(self)

    @property
    def labelnames(self) -> tuple[str, ...]:
        return self._labelnames

    def labels(self, *values: str) -> Series:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = Series(self._upper_bounds)
        return series

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        # A copy: a request may finish (and add a series) while another task is mid-exposition.
        for values, series in list(self._series.items()):
            family.add_metric(list(values), series.cumulative(), series.total)
        yield family
