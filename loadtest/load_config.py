"""One load run's settings: target, workload, arrivals, caps, client options and SLOs, checked when made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from loadtest.workloads import RandomPrompts, TraceReplay, Workload


@dataclass(frozen=True)
class LoadConfig:
    """One load run. Arrivals: `rate` (Poisson, sessions/s) if set, else `concurrency` closed-loop streams;
    a TraceReplay workload brings its own arrival times. Always bounded by num_requests and/or duration_s."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "chat"
    model: str = "demo"
    workload: Workload = field(default_factory=RandomPrompts)
    concurrency: int = 1
    rate: float | None = None
    burstiness: float = 1.0
    # Closed loop: streams start spread over this many seconds; requests sent meanwhile, and each stream's first,
    # are not measured.
    ramp_up_s: float = 0.0
    max_concurrency: int | None = None
    num_requests: int | None = 100
    duration_s: float | None = None
    drain_timeout_s: float = 30.0
    warmup_requests: int = 0
    ignore_eos: bool = False
    continuous_usage: bool = True
    headers: tuple[tuple[str, str], ...] = ()
    request_timeout_s: float = 600.0
    read_timeout_s: float = 60.0
    slos_s: tuple[tuple[str, float], ...] = ()
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    allow_remote: bool = False
    seed: int = 0
    progress: bool = True
    label: str = ""

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("a run needs a bound: num_requests and/or duration_s")
        if self.concurrency < 1 or (self.rate is not None and self.rate <= 0):
            raise ValueError("concurrency must be >= 1 and rate > 0")
        if self.ramp_up_s < 0:
            raise ValueError("ramp_up_s must be >= 0")

    @property
    def arrival(self) -> Literal["trace", "poisson", "concurrency"]:
        if isinstance(self.workload, TraceReplay):
            return "trace"
        return "poisson" if self.rate is not None else "concurrency"

    def describe(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "workload"}
        data["headers"] = [name for name, _ in self.headers]  # values may hold secrets
        workload = self.workload
        fields: dict[str, Any] = {}
        if dataclasses.is_dataclass(workload) and not isinstance(workload, type):
            fields = dataclasses.asdict(workload)
        data["workload"] = {"kind": type(workload).__name__, **{k: str(v) for k, v in fields.items()}}
        data["arrival"] = self.arrival
        return data
