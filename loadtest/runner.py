"""Load generator scheduler: a workload's requests by fixed concurrency, Poisson arrivals or a trace, within caps."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from loadtest.load_config import LoadConfig
from loadtest.records import RequestResult, RequestSpec
from loadtest.sse_client import ClientOptions, build_client, send_request
from loadtest.summary import summarize
from loadtest.targets import resolve_target
from loadtest.wire_client import StreamClient
from loadtest.workloads import Session

# LoadConfig has its own module; the generator, the benchmarks and the tests import it from here.
__all__ = ["LoadConfig", "RunResult", "arrival_offsets", "run_scenario", "run_sweep", "slos_from"]


@dataclass
class RunResult:
    config: LoadConfig
    records: list[RequestResult]
    summary: dict[str, Any]
    duration_s: float
    started_at: float  # wall-clock epoch seconds


class _Run:
    """State of one run: budget, records and progress, shared by its request tasks."""

    def __init__(self, config: LoadConfig, client: StreamClient, options: ClientOptions,
                 on_record: Callable[[RequestResult], None]) -> None:
        self.config = config
        self.client = client
        self.options = options
        self.on_record = on_record
        self.records: list[RequestResult] = []
        self.measured = 0
        self.start = time.perf_counter()
        self.ramp_up_end = self.start + config.ramp_up_s
        self.deadline = self.start + config.duration_s if config.duration_s is not None else None
        self.limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

    def _take(self, opens_stream: bool = False) -> RequestResult | None:
        """Claim the next request slot, or None once a cap is reached; ramp-up requests do not count.

        A stream's first request belongs to the ramp-up even when it leaves after the ramp-up's end: the last
        streams' starts slip past it when the generator is busy, and a target that is slow to accept new
        connections would otherwise have its ramp-up measured as steady state.
        """
        if self.exhausted:
            return None
        ramp_up = time.perf_counter() < self.ramp_up_end or (opens_stream and self.config.ramp_up_s > 0)
        record = RequestResult(index=len(self.records), ramp_up=ramp_up)
        self.records.append(record)
        self.measured += not ramp_up
        return record

    @property
    def exhausted(self) -> bool:
        cap = self.config.num_requests
        if cap is not None and self.measured >= cap:
            return True
        return self.deadline is not None and time.perf_counter() >= self.deadline

    async def session_task(self, session: Session, spec: RequestSpec, opens_stream: bool = False) -> None:
        """Run a session's requests one after another, feeding each reply into the next turn."""
        while True:
            arrived = time.perf_counter()
            if self.limit is not None:
                await self.limit.acquire()
            try:
                record = self._take(opens_stream)
                opens_stream = False
                if record is None:
                    return
                record.queue_s = time.perf_counter() - arrived
                record.session, record.turn = spec.session, spec.turn
                try:
                    reply = await send_request(self.client, self.options, spec, record, run_start=self.start,
                                               want_text=spec.session is not None)
                finally:
                    self.on_record(record)
            finally:
                if self.limit is not None:
                    self.limit.release()
            if not record.ok:
                return  # a failed turn ends its conversation
            try:
                spec = session.send(reply)
            except StopIteration:
                return

    async def closed_loop(self, sessions: Iterator[Session]) -> None:
        """`concurrency` streams, each sending its next request when the last one ends. With ramp_up_s the
        streams start evenly spread over it: started together, equal requests keep them in lockstep, and
        every round then arrives as one burst, which measures the burst rather than the concurrency."""
        spacing = self.config.ramp_up_s / self.config.concurrency

        async def stream(position: int) -> None:
            if spacing:
                await asyncio.sleep(self.start + position * spacing - time.perf_counter())
            opens_stream = True
            while not self.exhausted:
                session = next(sessions, None)
                if session is None:
                    return
                first = next(session, None)
                if first is not None:
                    await self.session_task(session, first, opens_stream)
                    opens_stream = False

        await asyncio.gather(*(stream(position) for position in range(self.config.concurrency)))

    async def open_loop(self, sessions: Iterator[Session]) -> None:
        """Poisson (gamma when burstiness != 1) arrivals, or a trace's timestamps, on an absolute schedule."""
        config = self.config
        offsets = None
        if config.arrival == "poisson":
            assert config.rate is not None
            offsets = arrival_offsets(config.rate, config.burstiness, config.seed, config.num_requests)
        tasks: set[asyncio.Task[None]] = set()
        launched = 0
        for session in sessions:
            if self.exhausted or (config.num_requests is not None and launched >= config.num_requests):
                break
            first = next(session, None)
            if first is None:
                continue
            due = self.start + ((first.at or 0.0) if offsets is None else next(offsets))
            if self.deadline is not None and due >= self.deadline:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.session_task(session, first))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            launched += 1
        if tasks:
            await asyncio.gather(*tasks)


def arrival_offsets(rate: float, burstiness: float, seed: int, count: int | None) -> Iterator[float]:
    """Arrival times (s after start) with gamma-distributed gaps; shape 1 is a Poisson process.

    With a known count the times are rescaled so the last lands at count / rate, as vllm bench does, so that
    throughput does not swing with the random sum of the gaps.
    """
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    if count is None:
        offset = 0.0
        while True:
            offset += rng.gammavariate(burstiness, scale)
            yield offset
    offsets = list(itertools.accumulate(rng.gammavariate(burstiness, scale) for _ in range(count)))
    factor = (count / rate) / offsets[-1] if offsets and offsets[-1] > 0 else 1.0
    yield from (offset * factor for offset in offsets)


async def _warm_up(config: LoadConfig, client: StreamClient, options: ClientOptions) -> None:
    """Requests outside the measurement, so connection setup does not skew the first records. Their prompts
    come from another seed where the workload has one: replaying the measured prompts would put them in the
    server's prefix cache and understate those requests' TTFT (a trace has no other prompts to send)."""
    sessions = config.workload.for_warm_up().sessions()
    for index in range(config.warmup_requests):
        first = next(next(sessions, iter(())), None)
        if first is None:
            return
        await send_request(client, options, first, RequestResult(index=-1 - index), run_start=time.perf_counter())


async def run_scenario(config: LoadConfig, on_record: Callable[[RequestResult], None] | None = None) -> RunResult:
    """Run one load scenario in the caller's event loop and summarise it (the in-process API)."""
    url, chat = resolve_target(config.base_url, config.endpoint, allow_remote=config.allow_remote)
    options = ClientOptions(url=url, model=config.model, chat=chat, ignore_eos=config.ignore_eos,
                            continuous_usage=config.continuous_usage, headers=config.headers,
                            request_timeout_s=config.request_timeout_s, read_timeout_s=config.read_timeout_s)
    progress = _progress(config)
    started_at = time.time()

    def record_done(record: RequestResult) -> None:
        if progress is not None:
            progress.update(1)
        if on_record is not None:
            on_record(record)

    client = build_client(options)
    try:
        if config.warmup_requests:
            await _warm_up(config, client, options)
        run = _Run(config, client, options, record_done)
        sessions = iter(config.workload.sessions())
        driver = asyncio.ensure_future(
            run.closed_loop(sessions) if config.arrival == "concurrency" else run.open_loop(sessions))
        try:
            if config.duration_s is None:
                await driver
            else:
                # Past the duration no request starts; in-flight ones get drain_timeout_s, then are cancelled.
                await asyncio.wait({driver}, timeout=config.duration_s + config.drain_timeout_s)
                if not driver.done():
                    driver.cancel()
                    await asyncio.gather(driver, return_exceptions=True)
        finally:
            duration = time.perf_counter() - run.start
            if progress is not None:
                progress.close()
    finally:
        await client.aclose()
    # Rates are over the measured part: from the end of the ramp-up, when every stream runs, counting what
    # arrived in it from every request (the ramp-up's own requests run on into it).
    ramp_up_s = min(config.ramp_up_s, duration)
    summary = summarize(run.records, duration - ramp_up_s, slos_s=dict(config.slos_s), percentiles=config.percentiles,
                        rate_window_s=(ramp_up_s, duration) if ramp_up_s > 0 else None)
    return RunResult(config=config, records=run.records, summary=summary, duration_s=duration, started_at=started_at)


def _progress(config: LoadConfig) -> Any:
    if not config.progress:
        return None
    from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs; only update() and close() are used

    return tqdm(total=config.num_requests, unit="req", desc=config.label or "loadtest", mininterval=0.5,
                dynamic_ncols=True, leave=False)


async def run_sweep(
    config: LoadConfig, kind: Literal["concurrency", "rate"], levels: Sequence[float]
) -> list[RunResult]:
    """The same scenario at each load level, one after another."""
    results = []
    for level in levels:
        if kind == "concurrency":
            step = dataclasses.replace(config, concurrency=int(level), rate=None, label=f"concurrency={int(level)}")
        else:
            step = dataclasses.replace(config, rate=float(level), label=f"rate={level:g}")
        results.append(await run_scenario(step))
    return results


def slos_from(mapping: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(mapping.items()))
