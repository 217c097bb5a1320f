"""What each worker delivers at each load, learned online from the gateway's own finished requests: the time per
output token (TPOT) a request got, by how many requests this gateway had open on its worker over the request's
life (time-weighted: the load it was actually served at, not the one it found on arrival, which a busy pool
changes within a second), and the worker's draft acceptance when it speculates.

Contract: `observe` takes any finished request and ignores those without a TPOT (one token, failed, no worker);
`expected_tpot` answers from the worker's TPOT curve over load (`tpot_curve`: never falling as load rises,
interpolated between the loads measured, and growing in proportion to load beyond the highest; None for a worker
never seen); everything is bounded (a few numbers per worker and load bucket) and forgets old behaviour at the rate
of its moving averages. `advice` compares speculating and non-speculating workers of a model at the loads its
traffic actually ran at.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Any

from gateway.observability.record import RequestRecord

# Load buckets by this gateway's open requests on the worker, the new one included: upper bounds, inclusive.
LOAD_BOUNDS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SMOOTHING = 0.1  # weight of the newest request in a moving average: about the last 20 requests count


@dataclass(slots=True)
class MovingAverage:
    value: float = 0.0
    count: int = 0

    def add(self, sample: float) -> None:
        self.count += 1
        # The plain mean until there are enough samples for the average to have settled.
        weight = max(SMOOTHING, 1.0 / self.count)
        self.value += weight * (sample - self.value)


@dataclass(slots=True)
class WorkerServing:
    """One worker's record: TPOT per load bucket, acceptance when it speculates."""

    tpot: dict[int, MovingAverage] = field(default_factory=dict)
    acceptance: MovingAverage = field(default_factory=MovingAverage)
    speculated: int = 0  # requests it reported speculation for
    requests: int = 0

    @property
    def speculates(self) -> bool:
        return self.speculated * 2 > self.requests


def load_bucket(open_requests: float) -> int:
    """The bucket of a load, rounded to whole requests: index into LOAD_BOUNDS (the last holds all above)."""
    return min(bisect.bisect_left(LOAD_BOUNDS, max(round(open_requests), 1)), len(LOAD_BOUNDS) - 1)


class ServingStats:
    """Per model and worker, what requests got; fed at each request's accounting."""

    def __init__(self) -> None:
        self._workers: dict[tuple[str, str], WorkerServing] = {}
        # Per model, how many requests ran at each load bucket: the traffic the advice is weighed by.
        self._traffic: dict[str, dict[int, int]] = {}

    def observe(self, record: RequestRecord) -> None:
        tokens_per_second = record.output_tokens_per_second
        served_at_load = record.worker_mean_open or record.worker_open_at_start
        if tokens_per_second is None or served_at_load <= 0 or record.status != "200":
            return
        serving = self._workers.setdefault((record.model, record.worker), WorkerServing())
        bucket = load_bucket(served_at_load)
        serving.tpot.setdefault(bucket, MovingAverage()).add(1.0 / tokens_per_second)
        serving.requests += 1
        if record.spec_acceptance_rate is not None:
            serving.speculated += 1
            serving.acceptance.add(record.spec_acceptance_rate)
        traffic = self._traffic.setdefault(record.model, {})
        traffic[bucket] = traffic.get(bucket, 0) + 1

    def expected_tpot(self, model: str, worker_url: str, open_requests: float) -> float | None:
        """The TPOT a request starting now would get on this worker, with `open_requests` open there with it."""
        serving = self._workers.get((model, worker_url))
        if serving is None or not serving.tpot:
            return None
        return tpot_curve(serving.tpot, open_requests)

    def forget(self, worker_url: str) -> None:
        for key in [key for key in self._workers if key[1] == worker_url]:
            del self._workers[key]

    def advice(self) -> dict[str, Any]:
        """Per model: each worker's measurements and whether speculating or plain workers would serve the traffic
        seen so far better (lower expected TPOT, weighted by the loads that traffic ran at)."""
        models: dict[str, Any] = {}
        for (model, worker_url), serving in sorted(self._workers.items()):
            entry = models.setdefault(model, {"workers": [], "advice": None})
            entry["workers"].append({
                "worker": worker_url,
                "speculates": serving.speculates,
                "acceptance_rate": round(serving.acceptance.value, 4) if serving.speculated else None,
                "requests": serving.requests,
                "tpot_s_by_open_requests": {
                    _bucket_label(bucket): {"tpot_s": round(average.value, 6), "requests": average.count}
                    for bucket, average in sorted(serving.tpot.items())
                },
            })
        for model, entry in models.items():
            entry["advice"] = self._model_advice(model)
        return models

    def _model_advice(self, model: str) -> dict[str, Any]:
        traffic = self._traffic.get(model, {})
        groups: dict[bool, list[WorkerServing]] = {True: [], False: []}
        for (served_model, _), serving in self._workers.items():
            if served_model == model:
                groups[serving.speculates].append(serving)
        if not groups[True] or not groups[False] or not traffic:
            return {"verdict": "not enough data: it needs speculating and plain workers of the model to compare"}
        expected = {speculates: _weighted_tpot(members, traffic) for speculates, members in groups.items()}
        better = "speculating" if expected[True] < expected[False] else "plain"
        return {
            "verdict": f"{better} workers serve this traffic better",
            "expected_tpot_s": {"speculating": round(expected[True], 6), "plain": round(expected[False], 6)},
            "requests_by_open_requests": {_bucket_label(b): n for b, n in sorted(traffic.items())},
        }


def bucket_load(bucket: int) -> float:
    """The load a bucket stands for: the middle of its range."""
    lower = LOAD_BOUNDS[bucket - 1] + 1 if bucket else 1
    return (lower + LOAD_BOUNDS[bucket]) / 2


def tpot_curve(averages: dict[int, MovingAverage], load: float) -> float:
    """Expected TPOT at `load` from the averages per load bucket.

    A worker does not get faster as its batch grows, so the measured points are first made non-decreasing (pool
    adjacent violators, weighted by samples): a noisy bucket must not attract load. Between points the curve is
    linear; above the highest measured load it grows in proportion to load, never flat: taking the nearest point
    there would call a worker as fast at 30 open requests as at the 8 it was seen at, and pile requests on it
    until they prove otherwise."""
    blocks: list[list[float]] = []  # [load, value, weight] merged left to right
    for bucket in sorted(averages):
        average = averages[bucket]
        blocks.append([bucket_load(bucket), average.value, float(min(average.count, 20))])
        while len(blocks) > 1 and blocks[-2][1] > blocks[-1][1]:
            right = blocks.pop()
            left = blocks[-1]
            weight = left[2] + right[2]
            left[1] = (left[1] * left[2] + right[1] * right[2]) / weight
            left[0], left[2] = (left[0] * left[2] + right[0] * right[2]) / weight, weight
    if load <= blocks[0][0]:
        return blocks[0][1]
    for (low_load, low_value, _), (high_load, high_value, _) in itertools.pairwise(blocks):
        if load <= high_load:
            return low_value + (high_value - low_value) * (load - low_load) / (high_load - low_load)
    last_load, last_value, _ = blocks[-1]
    return last_value * load / last_load


def _weighted_tpot(members: list[WorkerServing], traffic: dict[int, int]) -> float:
    total = sum(traffic.values())
    expected = 0.0
    for bucket, requests in traffic.items():
        at_load = [tpot_curve(member.tpot, bucket_load(bucket)) for member in members if member.tpot]
        expected += requests / total * (sum(at_load) / len(at_load))
    return expected


def _bucket_label(bucket: int) -> str:
    upper = LOAD_BOUNDS[bucket]
    lower = LOAD_BOUNDS[bucket - 1] + 1 if bucket else 1
    if bucket == len(LOAD_BOUNDS) - 1:
        return f"{lower}+"
    return str(upper) if lower == upper else f"{lower}-{upper}"
