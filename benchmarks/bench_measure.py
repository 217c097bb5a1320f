"""Benchmark measurements: one load run against a target with the engine's counters, RSS and CPU around it,
and a hold of many idle streams for memory readings."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks.bench_targets import Target, rss_kib, tree_cpu_seconds
from loadtest.fake_config import FakeEngineConfig
from loadtest.records import RequestResult
from loadtest.runner import LoadConfig, run_scenario
from loadtest.summary import summarize
from loadtest.workloads import RandomPrompts

ENGINE_EVENTS = "fake_engine:sse_events_total"
ENGINE_TOKENS = "vllm:generation_tokens_total"
ENGINE_RUNNING = "vllm:num_requests_running"
# The benchmarks run the fake engine with its default token text.
TOKEN_TEXT = FakeEngineConfig().token_text


def engine_counters(engine_url: str) -> dict[str, float]:
    """The fake engine's cumulative SSE events (with choices) and generated tokens."""
    with urllib.request.urlopen(engine_url + "/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = {ENGINE_EVENTS: 0.0, ENGINE_TOKENS: 0.0, ENGINE_RUNNING: 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in found:
            found[name] = float(line.rsplit(" ", 1)[1])
    return {"events": found[ENGINE_EVENTS], "tokens": found[ENGINE_TOKENS], "running": found[ENGINE_RUNNING]}


async def engine_idle(engine_url: str, timeout_s: float = 60.0) -> float:
    """Wait until the engine runs no request (a gateway may go on streaming requests whose client left);
    returns how many were still running at the end (0 when idle)."""
    running = engine_counters(engine_url)["running"]
    for _ in range(int(timeout_s / 0.25)):  # polling another process: there is nothing to await instead
        if not running:
            break
        await asyncio.sleep(0.25)
        running = engine_counters(engine_url)["running"]
    return running


def host_steal() -> tuple[int, int]:
    """(steal, all) CPU time of this machine in clock ticks, from /proc/stat: on a VM, steal is time the host
    gave our virtual CPUs to someone else, which shows up as latency in every target alike."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share_since(before: tuple[int, int]) -> float | None:
    """The share of this machine's CPU time the host took since `before` (a host_steal() reading)."""
    steal, ticks = (after - earlier for after, earlier in zip(host_steal(), before, strict=True))
    return steal / ticks if ticks else None


def request_duration_s(ttft_ms: float, gap_ms: float, output_len: int) -> float:
    """One fake-engine request's duration: a ramp-up over it spreads closed-loop streams evenly."""
    return (ttft_ms + gap_ms * output_len) / 1000


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Run:
    """One measured load run (or several rounds of the same target and level, pooled)."""

    target: str
    level: int
    records: list[RequestResult] = field(default_factory=list)
    duration_s: float = 0.0
    engine_events: float = 0.0
    engine_tokens: float = 0.0
    target_cpu_s: float = 0.0
    engine_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    rss_idle_kib: int = 0
    rss_peak_kib: int = 0
    rounds: int = 0
    ttft_p50_by_round: list[float] = field(default_factory=list)
    ttft_p99_by_round: list[float] = field(default_factory=list)

    def add(self, other: Run) -> None:
        self.records += other.records
        self.duration_s += other.duration_s
        self.engine_events += other.engine_events
        self.engine_tokens += other.engine_tokens
        self.target_cpu_s += other.target_cpu_s
        self.engine_cpu_s += other.engine_cpu_s
        self.client_cpu_s += other.client_cpu_s
        self.rss_idle_kib = self.rss_idle_kib or other.rss_idle_kib
        self.rss_peak_kib = max(self.rss_peak_kib, other.rss_peak_kib)
        self.rounds += other.rounds
        self.ttft_p50_by_round += other.ttft_p50_by_round
        self.ttft_p99_by_round += other.ttft_p99_by_round

    def row(self) -> dict[str, Any]:
        """The pooled summary: percentiles over all rounds' requests, 1:1 counts, CPU and memory."""
        summary = summarize(self.records, self.duration_s, percentiles=(50.0, 99.0))
        # Delivery, errors and rates count every request, ramp-up ones too; latencies only the measured ones.
        events = sum(len(r.itl_s) + (r.ttft_s is not None) for r in self.records)
        tokens = sum(r.output_tokens for r in self.records)
        # Counted from the text received, not from the usage the engine reports (which would match its own count
        # whatever was lost or repeated on the way): the fake engine writes TOKEN_TEXT once per token.
        delivered_tokens = sum(r.content_chars for r in self.records) / len(TOKEN_TEXT)
        errors = Counter(r.kind for r in self.records if not r.ok)
        wall = max(self.duration_s, 1e-9)
        return {
            "target": self.target, "level": self.level, "rounds": self.rounds,
            "requests": summary["requests"], "errors": dict(sorted(errors.items())),
            "ttft_ms": summary["ttft_ms"], "tpot_ms": summary["tpot_ms"], "itl_ms": summary["itl_ms"],
            "e2e_ms": summary["e2e_ms"], "event_throughput": events / wall,
            "output_throughput": tokens / wall,
            "client_events": events, "engine_events": self.engine_events,
            "client_tokens": round(delivered_tokens) if delivered_tokens.is_integer() else delivered_tokens,
            "engine_tokens": self.engine_tokens,
            "tokens_estimated": summary["tokens_estimated"],
            "target_cpu_share": self.target_cpu_s / wall,
            "target_us_per_event": self.target_cpu_s / events * 1e6 if events else None,
            "core1_busy": (self.engine_cpu_s + self.client_cpu_s) / wall,
            "rss_idle_mib": self.rss_idle_kib / 1024, "rss_peak_mib": self.rss_peak_kib / 1024,
            "ttft_p50_by_round": self.ttft_p50_by_round,
            "ttft_p99_by_round": self.ttft_p99_by_round,
            "error_samples": {r.kind: r.error[:200] for r in reversed(self.records) if not r.ok},
        }


async def _sample_rss(pid: int, peak: list[int], interval_s: float = 0.2) -> None:
    while True:
        peak[0] = max(peak[0], rss_kib(pid))
        await asyncio.sleep(interval_s)


def load_config(url: str, concurrency: int, *, output_len: int, num_requests: int | None = None,
                duration_s: float | None = None, ramp_up_s: float = 0.0, label: str = "",
                progress: bool = True) -> LoadConfig:
    """Closed-loop chat streams of `output_len` tokens; max_tokens = the engine's output length, no ignore_eos
    (not every peer forwards vLLM's extras), so each request gets exactly output_len tokens."""
    return LoadConfig(base_url=url, endpoint="chat", model="demo",
                      workload=RandomPrompts(input_len=32, output_len=output_len, seed=concurrency),
                      concurrency=concurrency, num_requests=num_requests, duration_s=duration_s,
                      ramp_up_s=ramp_up_s, drain_timeout_s=60.0, read_timeout_s=60.0, request_timeout_s=300.0,
                      progress=progress, label=label)


async def measure(target: Target, engine: Target, config: LoadConfig) -> Run:
    """Run `config` against `target` with the engine's counters, CPU times and the target's RSS around it."""
    leftover = await engine_idle(engine.url)
    if leftover:
        say(f"engine still runs {leftover:.0f} requests of an earlier run; its counters will include them")
    counters = engine_counters(engine.url)
    target_cpu = tree_cpu_seconds(target.pid) if target.pid else 0.0
    engine_cpu = tree_cpu_seconds(engine.pid) if engine.pid else 0.0
    client_cpu = self_cpu_seconds()
    peak = [rss_kib(target.pid) if target.pid else 0]
    idle = peak[0]
    sampler = asyncio.ensure_future(_sample_rss(target.pid, peak)) if target.pid else None
    try:
        result = await run_scenario(config)
    finally:
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    after = engine_counters(engine.url)
    run = Run(target=target.name, level=config.concurrency, records=result.records, duration_s=result.duration_s,
              engine_events=after["events"] - counters["events"], engine_tokens=after["tokens"] - counters["tokens"],
              target_cpu_s=(tree_cpu_seconds(target.pid) - target_cpu) if target.pid else 0.0,
              engine_cpu_s=(tree_cpu_seconds(engine.pid) - engine_cpu) if engine.pid else 0.0,
              client_cpu_s=self_cpu_seconds() - client_cpu, rss_idle_kib=idle, rss_peak_kib=peak[0], rounds=1)
    run.ttft_p50_by_round.append(result.summary["ttft_ms"]["p50"] or float("nan"))
    run.ttft_p99_by_round.append(result.summary["ttft_ms"]["p99"] or float("nan"))
    return run


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def hold_streams(url: str, streams: int, *, settle_s: float = 1.0, open_timeout_s: float = 60.0,
                       pid: int | None = None) -> dict[str, Any]:
    """Open `streams` chat streams that the engine stalls after their first events; read the target's RSS
    before, while they are all open, and after they are closed."""
    body = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "hold"}], "stream": True,
                         "max_completion_tokens": 64})
    headers = {"content-type": "application/json"}
    release, settled = asyncio.Event(), asyncio.Event()
    opened = failed = 0
    rss = {"before_mib": rss_kib(pid) / 1024 if pid else None}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)

    def count(ok: bool) -> None:
        nonlocal opened, failed
        opened, failed = opened + ok, failed + (not ok)
        if opened + failed == streams:
            settled.set()

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as response:
                if response.status != 200:
                    count(False)
                    return
                await response.content.readuntil(b"\n\n")  # the first event: the stream is open end to end
                count(True)
                await release.wait()
        except (aiohttp.ClientError, ValueError):
            count(False)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.ensure_future(one(session)) for _ in range(streams)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(settled.wait(), open_timeout_s)
        await asyncio.sleep(settle_s)
        rss["open_mib"] = rss_kib(pid) / 1024 if pid else None
        held, refused = opened, failed
        release.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(2.0)  # let the target notice the disconnects and free the streams
    rss["after_mib"] = rss_kib(pid) / 1024 if pid else None
    return {"streams": streams, "opened": held, "failures": refused, **rss}
