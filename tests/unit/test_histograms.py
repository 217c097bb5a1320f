"""BatchHistogram exposes exactly what prometheus_client's Histogram would for the same observations."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.histograms import BatchHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families for s in family.samples if not s.name.endswith("_created")
    }


def test_batched_observations_match_one_by_one_observations() -> None:
    reference_registry, batch_registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("gap_seconds", "doc", ["model"], buckets=BUCKETS, registry=reference_registry)
    batched = BatchHistogram("gap_seconds", "doc", ["model"], BUCKETS, batch_registry)
    rng = random.Random(7)
    # Values on the bounds included: Prometheus buckets are inclusive of their upper bound.
    values = [rng.choice([0.001, 0.01, 0.1, 1.0, 5.0]) if i % 3 == 0 else rng.uniform(0, 2) for i in range(300)]
    for value in values:
        times = rng.randint(1, 4)
        model = rng.choice(["a", "b"])
        for _ in range(times):
            reference.labels(model).observe(value)
        batched.labels(model).observe(value, times)
    expected, got = _samples(reference_registry), _samples(batch_registry)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_a_series_created_before_use_is_exposed_at_zero_and_labels_are_checked() -> None:
    registry = CollectorRegistry()
    histogram = BatchHistogram("tokens_per_chunk", "doc", ["model", "worker"], (1, 2, 4), registry)
    histogram.labels("demo", "w1")
    assert registry.get_sample_value("tokens_per_chunk_count", {"model": "demo", "worker": "w1"}) == 0
    assert registry.get_sample_value("tokens_per_chunk_bucket", {"model": "demo", "worker": "w1", "le": "+Inf"}) == 0
    with pytest.raises(ValueError, match="takes labels"):
        histogram.labels("demo")


@pytest.mark.parametrize("values", [
    [], [0.01], [0.001, 0.01, 0.1, 1.0], [5.0, 7.0], [0.0005] * 40 + [0.05, 0.05, 0.0099, 0.01, 3.0],
], ids=["none", "one", "on-every-bound", "above-the-last-bound", "many"])
def test_values_observed_each_at_once_match_one_by_one_observations(values: list[float]) -> None:
    reference_registry, batch_registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("gap_seconds", "doc", ["model"], buckets=BUCKETS, registry=reference_registry)
    batched = BatchHistogram("gap_seconds", "doc", ["model"], BUCKETS, batch_registry)
    shuffled = values[::-1] + values[::2]  # unordered, with repeats
    series = reference.labels("a")
    for value in shuffled:
        series.observe(value)
    batched.labels("a").observe_each(shuffled)
    expected, got = _samples(reference_registry), _samples(batch_registry)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
