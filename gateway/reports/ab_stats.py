"""The numbers behind `specgate ab-report`: per route, each served version's request counts, error rates and
latency samples with confidence intervals, a significance test for every pair of versions, and shadow-pair
comparisons; ab_report.py reads the logs into `Entry`s and renders what `analyse` returns.

Contract: pure functions of the entries given, no I/O. Versions are compared on their non-shadow requests;
latency and output length come from 2xx requests only (a failed request's TTFT says nothing about the version),
errors are 5xx answers and 4xx (499, the client leaving, included) are counted apart. scipy is imported when a
statistic is computed, not with this module, so the gateway and the CLI's other commands never load it.
"""

from __future__ import annotations

import importlib
import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

LEVEL = 0.95  # of every confidence interval in the report
METRICS = ("TTFT", "TPOT", "output tokens")
Interval = tuple[float, float]


def _scipy_stats() -> Any:
    # Through importlib: scipy ships no type information, and the gateway's mypy run must not need it installed.
    return importlib.import_module("scipy.stats")


@dataclass(frozen=True)
class Entry:
    """The fields of one request-log line the report uses."""

    time: float
    request_id: str
    route: str | None
    served_model: str | None
    status: str
    ttft_s: float | None
    tpot_s: float | None
    output_tokens: int | None
    shadow_of: str | None = None
    greedy: bool = False
    output_sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.status.startswith("2")

    def metric(self, name: str) -> float | None:
        value = {"TTFT": self.ttft_s, "TPOT": self.tpot_s, "output tokens": self.output_tokens}[name]
        return None if value is None else float(value)


@dataclass(frozen=True)
class Sample:
    """Median and mean of one metric with their `LEVEL` confidence intervals; None where n is too small."""

    n: int
    median: float | None = None
    median_ci: Interval | None = None
    mean: float | None = None
    mean_ci: Interval | None = None


def describe(values: Sequence[float], level: float = LEVEL) -> Sample:
    if not values:
        return Sample(0)
    ordered = sorted(values)
    return Sample(len(ordered), statistics.median(ordered), median_ci(ordered, level), statistics.fmean(ordered),
                  mean_ci(ordered, level))


def median_ci(ordered: Sequence[float], level: float = LEVEL) -> Interval | None:
    """Distribution-free CI of the median from order statistics: [x_(k), x_(n-k+1)] (1-based ranks) with k the
    binomial quantile, so P(Bin(n, 1/2) < k) < (1 - level)/2 on each side; None when n is too small (< 6 at 95 %)."""
    n = len(ordered)
    k = int(_scipy_stats().binom.ppf((1 - level) / 2, n, 0.5))  # the smallest k with P(B <= k) >= (1 - level)/2
    return (ordered[k - 1], ordered[n - k]) if k >= 1 else None


def mean_ci(values: Sequence[float], level: float = LEVEL) -> Interval | None:
    """Student's t interval: latency is skewed, but at the sample sizes an A/B test runs at the mean is ~normal."""
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = float(_scipy_stats().t.ppf((1 + level) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return (mean - half, mean + half)


def wilson_ci(hits: int, n: int, level: float = LEVEL) -> Interval | None:
    """Wilson score interval of a proportion: unlike p ± z·se it stays in [0, 1] and holds at 0 or 1 % rates."""
    if n == 0:
        return None
    z = float(_scipy_stats().norm.ppf((1 + level) / 2))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Mann–Whitney U p-value; None when a side is empty or every value ties (no test possible)."""
    if not a or not b:
        return None
    p = float(_scipy_stats().mannwhitneyu(a, b, alternative="two-sided").pvalue)
    return None if math.isnan(p) else p


def two_proportion(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float | None:
    """Two-sided p-value of the pooled two-proportion z-test; 1.0 when both rates are 0 (or both 1)."""
    if n_a == 0 or n_b == 0:
        return None
    pooled = (hits_a + hits_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 1.0
    z = (hits_a / n_a - hits_b / n_b) / se
    return float(2 * _scipy_stats().norm.sf(abs(z)))


def _values(entries: Iterable[Entry]) -> dict[str, list[float]]:
    ok = [entry for entry in entries if entry.ok]
    return {name: [v for v in (entry.metric(name) for entry in ok) if v is not None] for name in METRICS}


@dataclass(frozen=True)
class VersionStats:
    version: str
    requests: int
    errors: int  # 5xx
    client_errors: int  # 4xx, 499 included
    values: dict[str, list[float]]  # per metric, from 2xx requests (the plot draws them)
    samples: dict[str, Sample]

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def error_ci(self) -> Interval | None:
        return wilson_ci(self.errors, self.requests)


def version_stats(version: str, entries: Sequence[Entry]) -> VersionStats:
    values = _values(entries)
    return VersionStats(version, len(entries), sum(e.status.startswith("5") for e in entries),
                        sum(e.status.startswith("4") for e in entries), values,
                        {name: describe(values[name]) for name in METRICS})


@dataclass(frozen=True)
class PairTest:
    """One metric of two versions: the compared values (medians; error rates for "error rate") and the p-value."""

    a: str
    b: str
    metric: str
    a_value: float | None
    b_value: float | None
    test: str
    p_value: float | None

    def significant(self, alpha: float) -> bool:
        return self.p_value is not None and self.p_value < alpha


def pair_tests(a: VersionStats, b: VersionStats) -> list[PairTest]:
    tests = [PairTest(a.version, b.version, "error rate", a.error_rate, b.error_rate, "two-proportion z",
                      two_proportion(a.errors, a.requests, b.errors, b.requests))]
    for name in METRICS:
        tests.append(PairTest(a.version, b.version, name, a.samples[name].median, b.samples[name].median,
                              "Mann–Whitney U", mann_whitney(a.values[name], b.values[name])))
    return tests


@dataclass(frozen=True)
class ShadowStats:
    """Primary requests of one version paired with their shadow copies on another."""

    primary: str
    shadow: str
    pairs: int
    medians: dict[str, tuple[float | None, float | None]]  # metric: (primary's, shadow's)
    hashed: int  # pairs both greedy with both outputs hashed
    agreeing: int  # of those, the pairs whose outputs are the same

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.hashed if self.hashed else None


def shadow_stats(primary: str, shadow: str, pairs: Sequence[tuple[Entry, Entry]]) -> ShadowStats:
    firsts, seconds = _values(p for p, _ in pairs), _values(s for _, s in pairs)
    medians = {name: (_median(firsts[name]), _median(seconds[name])) for name in METRICS}
    hashed = [(p, s) for p, s in pairs if p.greedy and s.greedy and p.output_sha256 and s.output_sha256]
    return ShadowStats(primary, shadow, len(pairs), medians, len(hashed),
                       sum(p.output_sha256 == s.output_sha256 for p, s in hashed))


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class RouteReport:
    route: str
    versions: list[VersionStats]
    tests: list[PairTest]
    shadows: list[ShadowStats]
    unserved: int  # requests on the route no version served (refused before a worker: 429s, ...)


@dataclass(frozen=True)
class Analysis:
    routes: list[RouteReport]
    orphan_shadows: int  # shadow lines in the window whose primary is in none of the logs


def analyse(entries: Sequence[Entry], since: float | None = None, until: float | None = None,
            route: str | None = None) -> Analysis:
    """Per route (or only `route`): requests in [since, until); a shadow pair belongs where its primary does."""

    def wanted(entry: Entry) -> bool:
        return (entry.route is not None and (route is None or entry.route == route)
                and (since is None or entry.time >= since) and (until is None or entry.time < until))

    # Primaries are looked up in every line read, not only the window's: a pair can straddle its edge.
    primaries = {entry.request_id: entry for entry in entries if entry.shadow_of is None}
    requests: dict[str, list[Entry]] = defaultdict(list)
    pairs: dict[str, list[tuple[Entry, Entry]]] = defaultdict(list)
    orphans = 0
    for entry in entries:
        if entry.shadow_of is None:
            if wanted(entry):
                requests[str(entry.route)].append(entry)
        elif (primary := primaries.get(entry.shadow_of)) is not None:
            if wanted(primary):
                pairs[str(primary.route)].append((primary, entry))
        elif wanted(entry):
            orphans += 1
    return Analysis([_route(name, requests[name], pairs[name]) for name in sorted(set(requests) | set(pairs))],
                    orphans)


def _route(name: str, entries: Sequence[Entry], pairs: Sequence[tuple[Entry, Entry]]) -> RouteReport:
    served: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        if entry.served_model is not None:
            served[entry.served_model].append(entry)
    versions = [version_stats(version, group) for version, group in sorted(served.items())]
    tests = [test for a, b in itertools.combinations(versions, 2) for test in pair_tests(a, b)]
    by_pair: dict[tuple[str, str], list[tuple[Entry, Entry]]] = defaultdict(list)
    for primary, shadow in pairs:
        by_pair[(primary.served_model or "(none)", shadow.served_model or "(none)")].append((primary, shadow))
    shadows = [shadow_stats(p, s, group) for (p, s), group in sorted(by_pair.items())]
    return RouteReport(name, versions, tests, shadows, sum(e.served_model is None for e in entries))

