"""The two phases, each on a fresh stack: N stalled readers held until the send timeout has cut them (and the
kernel let go of their sockets), then N live readers for as long, read against them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench_measure import say
from benchmarks.bench_targets import rss_kib
from benchmarks.stalled.clients import Client, normal_request, open_streams, warm_up
from benchmarks.stalled.sampling import Sample, Sampler, progress
from benchmarks.stalled.stack import start_stack


@dataclass
class PhaseResult:
    name: str
    streams: int
    baseline_kib: int
    samples: list[Sample]
    opened_s: float
    hold_s: float
    t_stall: float | None = None
    end_at: float | None = None
    stall_times: list[float] = field(default_factory=list)
    drop_times: list[float] = field(default_factory=list)
    drop_after_stall: list[float] = field(default_factory=list)
    peak_queue_per_stream: list[int] = field(default_factory=list)
    final: Sample | None = None
    after_check: dict[str, Any] = field(default_factory=dict)
    orphans_gone_at: float | None = None
    closed: Sample | None = None
    watch_end: Sample | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Phase:
    """One phase under way: its streams open on a fresh stack, read by `sampler`, and what it found so far."""

    streams: dict[int, Client]
    sampler: Sampler
    result: PhaseResult
    progress_every: int
    tick: int = 0

    def read(self, label: str, *, always: bool = False) -> Sample:
        """One reading, printed every progress_every readings (`always`: printed, and not counted)."""
        sample = self.sampler.take()
        if always:
            progress(label, sample, self.result.streams, self.result.baseline_kib)
            return sample
        if self.tick % self.progress_every == 0:
            progress(label, sample, self.result.streams, self.result.baseline_kib)
        self.tick += 1
        return sample

    async def sleep_until(self, at: float) -> None:
        """Until `at` seconds after the first connection."""
        await asyncio.sleep(max(0.0, self.sampler.t0 + at - time.monotonic()))

    async def hold(self, interval_s: float, end_at: Callable[[Sample], float | None]) -> None:
        """A reading every interval_s until end_at (asked after each reading; None: not known yet) has passed."""
        end: float | None = None
        while end is None or time.monotonic() - self.sampler.t0 < end:
            sample = self.read(self.result.name)
            end = end_at(sample)
            await self.sleep_until(sample.t + interval_s)

    async def finish(self) -> None:
        """The last reading of the hold, then a normal request: does the gateway still serve?"""
        self.result.final = self.read(self.result.name, always=True)
        self.result.after_check = await normal_request(self.sampler.stack.gateway.url)


@contextlib.asynccontextmanager
async def phase(args: argparse.Namespace, log_dir: Path, name: str, *, stalled: bool, hold_s: float,
                doing: str) -> AsyncIterator[Phase]:
    """A fresh stack warmed up, its RSS baseline read, N streams opened (`doing`: what they do, for the log);
    the phase runs in the block; then the clients close and one reading 2 s later shows what was released."""
    with start_stack(args, log_dir, name) as stack:
        assert stack.gateway.pid is not None
        await warm_up(stack.gateway.url, args.warmup_requests)
        await asyncio.sleep(1.0)
        baseline = rss_kib(stack.gateway.pid)
        say(f"{name}: gateway {stack.gateway.url} (pid {stack.gateway.pid}) baseline RSS {baseline / 1024:.1f} MiB; "
            + doing)
        t0 = time.monotonic()
        streams = await open_streams(stack.gateway_port, args.streams, stalled=stalled,
                                     rcvbuf=args.rcvbuf if stalled else 0, max_tokens=args.max_tokens)
        opened_s = time.monotonic() - t0
        sampler = Sampler(stack, streams, t0)
        run = Phase(streams, sampler, PhaseResult(name, args.streams, baseline, sampler.samples, opened_s, hold_s),
                    args.progress_every)
        yield run
        for stream in streams.values():
            stream.close()
        await asyncio.sleep(2.0)
        run.result.closed = run.read("closed", always=True)
        run.result.peak_queue_per_stream = sorted(sampler.peak_queue.values())


async def stalled_phase(args: argparse.Namespace, log_dir: Path) -> PhaseResult:
    """Streams that read nothing, until they stalled + the send timeout + a margin; then the orphan watch."""
    doing = f"opening {args.streams} streams that read nothing (SO_RCVBUF {args.rcvbuf})"
    async with phase(args, log_dir, "stalled", stalled=True, hold_s=0.0, doing=doing) as run:
        result, sampler = run.result, run.sampler

        def end_at(sample: Sample) -> float | None:
            if result.end_at is not None:
                return result.end_at
            stalled = sampler.stalled_since(args.quiet_s)
            if stalled is not None:
                result.t_stall = stalled
                result.end_at = stalled + args.send_timeout_s + args.margin_s
                say(f"stalled: every stream's send queue stopped growing by t={stalled:.1f}s; "
                    f"measuring at t={result.end_at:.1f}s (+ send timeout {args.send_timeout_s:g}s + margin "
                    f"{args.margin_s:g}s)")
            elif sample.t > args.max_fill_s:
                result.end_at = sample.t + args.send_timeout_s + args.margin_s
                result.notes.append(f"send queues still growing after {args.max_fill_s:g}s; measured at "
                                    f"t={result.end_at:.1f}s anyway")
                say("stalled: " + result.notes[-1])
            return result.end_at

        await run.hold(args.interval_s, end_at)
        await run.finish()
        final = result.final
        assert final is not None
        result.hold_s = final.t
        say(f"stalled: a normal request afterwards: {result.after_check}")
        # With the clients still connected, how long the kernel keeps what the gateway let go of.
        sample = final
        while sample.orphans and sample.t < final.t + args.orphan_watch_s:
            await run.sleep_until(sample.t + 1.0)
            sample = run.read("orphans")
        if not sample.orphans:
            result.orphans_gone_at = sample.t
        result.watch_end = sample
    result.stall_times = sorted(sampler.last_growth.values())
    result.drop_times = sorted(sampler.dropped_at.values())
    result.drop_after_stall = sorted(sampler.dropped_at[p] - sampler.last_growth[p] for p in sampler.dropped_at
                                     if p in sampler.last_growth)
    return result


async def live_phase(args: argparse.Namespace, log_dir: Path, hold_s: float) -> PhaseResult:
    """The same number of streams read normally for `hold_s` (the stalled phase's hold)."""
    doing = f"{args.streams} streams read normally for {hold_s:.0f}s"
    async with phase(args, log_dir, "live", stalled=False, hold_s=hold_s, doing=doing) as run:
        await run.hold(args.interval_s, lambda _: hold_s)
        await run.finish()
        lost = sum(s.lost for s in run.streams.values())
        if lost:
            run.result.notes.append(f"{lost} live streams were closed before the end of the hold")
    return run.result
