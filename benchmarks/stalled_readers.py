"""Clients that stop reading: what the gateway holds for them, and whether it lets them go.

    flock /tmp/specgate-heavy.lock .venv/bin/python -m benchmarks.stalled_readers --streams 300 --send-timeout-s 20

The goal: N stalled readers hold <= 64 KiB of gateway memory each beyond the kernel's buffers; after the
deadline (the streams stalled + the send timeout), 0 of their sockets remain open at the gateway and the worker
runs 0 of their requests.

Two phases, each on a fresh fake engine (`specgate fake-engine`, pinned to --client-cpu with this process) and a
fresh gateway (`specgate gateway`, pinned to --gateway-cpu, SPECGATE_SSE_SEND_TIMEOUT_S=--send-timeout-s):

- stalled: after a warm-up of a few streamed requests read to the end (the RSS baseline), N raw TCP clients with
  a small SO_RCVBUF send a streaming chat request with a large max_tokens and then read nothing. Every
  --interval-s: the gateway's RSS, the kernel send queue (tx_queue in /proc/net/tcp) of its sockets to those
  clients, how many of them it still holds (psutil), orphaned kernel sockets left after it let go, and the
  engine's running requests. A stream has stalled when its send queue stops growing; the run goes on until the
  last one stalled + the send timeout + --margin-s, then checks that the gateway still serves a request, and
  watches the orphaned kernel sockets for up to --orphan-watch-s with the clients still connected.
- live: the same N streams read normally for the same time, so the stalled figures read against live readers.

Writes --out (Markdown, the command at its top) and a PNG beside it (same name, .png).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import psutil

# Only modules that import nothing of gateway/ (bench_measure and loadtest.report reach into its internals, which
# are being moved): the gateway and the engine are used through their CLIs alone.
from benchmarks.bench_targets import Target, engine_timing_args, rss_kib, run_process, tree_cpu_seconds
from loadtest.procs import free_port, pin_self, raise_open_file_limit

RESULTS = Path(__file__).parent / "results"
GOAL_KIB_PER_STREAM = 64.0
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
              "0B": "CLOSING"}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def host_steal() -> tuple[int, int]:
    """(steal, all) CPU time of this machine in clock ticks, from /proc/stat (as benchmarks.bench_measure reads it)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share_since(before: tuple[int, int]) -> float | None:
    steal, ticks = (after - earlier for after, earlier in zip(host_steal(), before, strict=True))
    return steal / ticks if ticks else None


ENGINE_METRICS = {"vllm:num_requests_running": "running", "fake_engine:sse_events_total": "events"}


def engine_counters(engine_url: str) -> dict[str, float]:
    """The fake engine's running requests and cumulative SSE events, from its /metrics."""
    found = dict.fromkeys(ENGINE_METRICS.values(), 0.0)
    with urllib.request.urlopen(engine_url + "/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            key = ENGINE_METRICS.get(line.split("{", 1)[0].split(" ", 1)[0])
            if key is not None:
                found[key] += float(line.rsplit(" ", 1)[1])
    return found


# --- processes -------------------------------------------------------------------------------------------------


def specgate_cli() -> str:
    """The `specgate` console script of this interpreter's venv (the CLI users run), else the one on PATH."""
    beside = Path(sys.executable).parent / "specgate"
    found = str(beside) if beside.exists() else shutil.which("specgate")
    if found is None:
        raise SystemExit("no `specgate` console script beside this interpreter or on PATH (make install)")
    return found


def token_text(size: int) -> str:
    """The fake engine's per-token text, `size` characters: with 1 token per event, an event is ~size+200 bytes."""
    return (" tok" * (size // 4 + 1))[:size]


def engine_argv(args: argparse.Namespace, port: int) -> list[str]:
    return [specgate_cli(), "fake-engine", "--port", str(port),
            *engine_timing_args(args.ttft_ms, args.gap_ms, args.output_len),
            "--max-running", "10000", "--max-model-len", str(args.output_len + 1024),
            "--token-text", token_text(args.token_chars), "--log-level", "warning"]


def gateway_env(args: argparse.Namespace) -> dict[str, str]:
    return {"SPECGATE_SSE_SEND_TIMEOUT_S": f"{args.send_timeout_s:g}", "SPECGATE_REQUEST_LOG": "false",
            "SPECGATE_MAX_CONCURRENCY": str(max(4096, 4 * args.streams))}


@dataclass(frozen=True)
class Stack:
    engine: Target
    gateway: Target
    gateway_port: int
    engine_port: int


@contextlib.contextmanager
def start_stack(args: argparse.Namespace, log_dir: Path, phase: str) -> Iterator[Stack]:
    """A fresh fake engine and a fresh gateway in front of it, each pinned to its core."""
    engine_port, gateway_port = free_port(), free_port()
    engine_url, gateway_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
    client_cpu, gateway_cpu = args.client_cpu or None, args.gateway_cpu or None
    gateway_argv = [specgate_cli(), "gateway", "--workers", engine_url, "--port", str(gateway_port),
                    "--log-level", "warning"]
    with (run_process(f"{phase}-engine-{engine_port}", engine_argv(args, engine_port), engine_url + "/health",
                      client_cpu, log_dir) as engine_pid,
          run_process(f"{phase}-gateway-{gateway_port}", gateway_argv, gateway_url + "/ready", gateway_cpu, log_dir,
                      gateway_env(args)) as gateway_pid):
        yield Stack(Target("engine", engine_url, engine_pid), Target("specgate", gateway_url, gateway_pid),
                    gateway_port, engine_port)


# --- clients ---------------------------------------------------------------------------------------------------


def request_bytes(port: int, max_tokens: int, content: str) -> bytes:
    body = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": content}], "stream": True,
                         "max_tokens": max_tokens})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class ClientStream(asyncio.Protocol):
    """One live client connection: reads (and counts) everything the gateway sends."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.events = 0
        self._newline = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        # SSE events end with a blank line; one may straddle two reads.
        self.events += data.count(b"\n\n") + (self._newline and data[:1] == b"\n")
        self._newline = data[-1:] == b"\n"

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class StalledClient:
    """One stalled client: a bare socket that sent its request and is never read (no transport, no reader)."""

    received = 0
    lost = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def close(self) -> None:
        self.sock.close()  # unread data in its receive queue: the kernel resets the connection


Client = ClientStream | StalledClient


async def open_stream(port: int, payload: bytes, stalled: bool, rcvbuf: int) -> tuple[Client, int]:
    """Connect (SO_RCVBUF set before connecting, so the window is small from the start), send the request."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        local_port = int(sock.getsockname()[1])
        if stalled:
            await loop.sock_sendall(sock, payload)
            return StalledClient(sock), local_port
        _, stream = await loop.create_connection(ClientStream, sock=sock)
    except BaseException:
        sock.close()
        raise
    assert stream.transport is not None
    stream.transport.write(payload)
    return stream, local_port


async def open_streams(port: int, count: int, *, stalled: bool, rcvbuf: int, max_tokens: int,
                       parallel: int = 50) -> dict[int, Client]:
    payload = request_bytes(port, max_tokens, "stall" if stalled else "read")
    gate = asyncio.Semaphore(parallel)

    async def one() -> tuple[Client, int]:
        async with gate:
            return await open_stream(port, payload, stalled, rcvbuf)

    opened = await asyncio.gather(*(one() for _ in range(count)))
    return {local_port: stream for stream, local_port in opened}


async def normal_request(url: str, max_tokens: int = 32, timeout_s: float = 30.0) -> dict[str, Any]:
    """One streamed chat request read to its end: status, events, whether [DONE] came, seconds."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "stream": True,
            "max_tokens": max_tokens}
    started = time.perf_counter()
    try:
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
                    session.post(url + "/v1/chat/completions", json=body) as response):
            data = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"ok": False, "status": None, "events": 0, "done": False, "seconds": time.perf_counter() - started,
                "error": repr(exc)[:200]}
    events = data.count(b"data: ")
    done = b"data: [DONE]" in data
    return {"ok": status == 200 and done, "status": status, "events": events, "done": done,
            "seconds": time.perf_counter() - started, "error": "" if status == 200 else data[:200].decode("replace")}


async def warm_up(url: str, requests: int) -> None:
    """A few normal streams read to the end, two at a time: the gateway's first requests are not measured."""
    for start in range(0, requests, 2):
        results = await asyncio.gather(*(normal_request(url) for _ in range(min(2, requests - start))))
        failed = [r for r in results if not r["ok"]]
        if failed:
            raise RuntimeError(f"warm-up request failed: {failed[0]}")


# --- readings --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpRow:
    local_port: int
    remote_port: int
    state: str
    tx_queue: int
    rx_queue: int
    inode: int


def tcp_table() -> list[TcpRow]:
    """IPv4 TCP sockets of this network namespace (everything here is on 127.0.0.1), one per port pair: the
    kernel writes the table in pieces, so a socket can appear twice in one read while sockets come and go."""
    rows: dict[tuple[int, int], TcpRow] = {}
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            tx, rx = queues.split(":")
            row = TcpRow(int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16),
                         TCP_STATES.get(fields[3], fields[3]), int(tx, 16), int(rx, 16), int(fields[9]))
            rows[row.local_port, row.remote_port] = row
    return list(rows.values())


def held_client_ports(pid: int, gateway_port: int) -> set[int]:
    """Remote ports of the gateway's own sockets (file descriptors it holds) accepted on its listening port."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp4")
    except psutil.Error:
        return set()
    return {c.raddr.port for c in connections if c.raddr and c.laddr.port == gateway_port}


@dataclass
class Sample:
    t: float
    rss_kib: int
    send_queue: int  # bytes in the kernel send queues of the gateway's sockets to the clients (orphans too)
    held: int  # gateway sockets (fds) to the clients
    orphans: int  # kernel sockets to the clients the gateway no longer holds (no fd), still not closed
    orphan_queue: int
    engine_running: float
    engine_events: float
    upstream_unread: int  # bytes the engine sent that wait unread in the gateway's upstream sockets
    engine_queue: int  # bytes in the engine's send queues to the gateway
    client_bytes: int
    gateway_cpu_s: float
    states: dict[str, int] = field(default_factory=dict)


class Sampler:
    """Readings every interval; per client socket, when its send queue last grew and when the gateway let go."""

    def __init__(self, stack: Stack, streams: dict[int, Client], t0: float) -> None:
        self.stack = stack
        self.streams = streams
        self.t0 = t0
        self.samples: list[Sample] = []
        self.peak_queue: dict[int, int] = {}
        self.last_growth: dict[int, float] = {}
        self.dropped_at: dict[int, float] = {}
        self.seen_held: set[int] = set()

    def take(self) -> Sample:
        now = time.monotonic() - self.t0
        gateway, engine = self.stack.gateway, self.stack.engine
        assert gateway.pid is not None and engine.pid is not None
        rss = rss_kib(gateway.pid)
        held = held_client_ports(gateway.pid, self.stack.gateway_port) & self.streams.keys()
        queue = orphans = orphan_queue = upstream_unread = engine_queue = 0
        states: dict[str, int] = {}
        for row in tcp_table():
            if row.local_port == self.stack.gateway_port and row.remote_port in self.streams:
                queue += row.tx_queue
                states[row.state] = states.get(row.state, 0) + 1
                if row.remote_port in self.seen_held and row.remote_port not in held and row.state != "TIME_WAIT":
                    orphans += 1
                    orphan_queue += row.tx_queue
                # Growth counts while the connection is open and held (a close queues a FIN: one byte more).
                if (row.remote_port in held and row.state == "ESTABLISHED"
                        and row.tx_queue > self.peak_queue.get(row.remote_port, 0)):
                    self.peak_queue[row.remote_port] = row.tx_queue
                    self.last_growth[row.remote_port] = now
            elif row.remote_port == self.stack.engine_port:
                upstream_unread += row.rx_queue
            elif row.local_port == self.stack.engine_port:
                engine_queue += row.tx_queue
        self.seen_held |= held
        for port in self.seen_held - held:
            self.dropped_at.setdefault(port, now)
        try:
            counters = engine_counters(engine.url)
        except OSError:
            counters = {"running": float("nan"), "events": float("nan")}
        sample = Sample(t=now, rss_kib=rss, send_queue=queue, held=len(held), orphans=orphans,
                        orphan_queue=orphan_queue, engine_running=counters["running"],
                        engine_events=counters["events"], upstream_unread=upstream_unread, engine_queue=engine_queue,
                        client_bytes=sum(s.received for s in self.streams.values()),
                        gateway_cpu_s=tree_cpu_seconds(gateway.pid), states=states)
        self.samples.append(sample)
        return sample

    def stalled_since(self, quiet_s: float) -> float | None:
        """When the last held stream's send queue last grew, once none has grown for quiet_s; else None."""
        now = time.monotonic() - self.t0
        live = [p for p in self.streams if p not in self.dropped_at]
        if not live or any(p not in self.last_growth for p in live):
            return None
        last = max(self.last_growth[p] for p in live)
        return last if now - last >= quiet_s else None


def progress(phase: str, s: Sample, n: int, baseline_kib: int) -> None:
    say(f"{phase:>7} t={s.t:6.1f}s  rss +{(s.rss_kib - baseline_kib) / 1024:7.1f} MiB "
        f"({(s.rss_kib - baseline_kib) / n:6.1f} KiB/stream)  send queue {s.send_queue / 2**20:7.1f} MiB  "
        f"held {s.held:4d}/{n}  orphans {s.orphans:4d} ({s.orphan_queue / 2**20:.1f} MiB)  "
        f"engine running {s.engine_running:5.0f}  upstream unread {s.upstream_unread / 2**20:6.1f} MiB  "
        f"client {s.client_bytes / 2**20:8.1f} MiB")


# --- phases ----------------------------------------------------------------------------------------------------


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


async def _sleep_until(t0: float, at: float) -> None:
    await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))


async def stalled_phase(args: argparse.Namespace, log_dir: Path) -> PhaseResult:
    n = args.streams
    with start_stack(args, log_dir, "stalled") as stack:
        assert stack.gateway.pid is not None
        await warm_up(stack.gateway.url, args.warmup_requests)
        await asyncio.sleep(1.0)
        baseline = rss_kib(stack.gateway.pid)
        say(f"stalled: gateway {stack.gateway.url} (pid {stack.gateway.pid}) baseline RSS {baseline / 1024:.1f} MiB; "
            f"opening {n} streams that read nothing (SO_RCVBUF {args.rcvbuf})")
        t0 = time.monotonic()
        streams = await open_streams(stack.gateway_port, n, stalled=True, rcvbuf=args.rcvbuf,
                                     max_tokens=args.max_tokens)
        opened_s = time.monotonic() - t0
        sampler = Sampler(stack, streams, t0)
        result = PhaseResult("stalled", n, baseline, sampler.samples, opened_s, 0.0)
        end_at: float | None = None
        tick = 0
        while end_at is None or time.monotonic() - t0 < end_at:
            sample = sampler.take()
            if tick % args.progress_every == 0:
                progress("stalled", sample, n, baseline)
            tick += 1
            if end_at is None:
                stalled = sampler.stalled_since(args.quiet_s)
                if stalled is not None:
                    result.t_stall = stalled
                    end_at = stalled + args.send_timeout_s + args.margin_s
                    say(f"stalled: every stream's send queue stopped growing by t={stalled:.1f}s; "
                        f"measuring at t={end_at:.1f}s (+ send timeout {args.send_timeout_s:g}s + margin "
                        f"{args.margin_s:g}s)")
                elif sample.t > args.max_fill_s:
                    end_at = sample.t + args.send_timeout_s + args.margin_s
                    result.notes.append(f"send queues still growing after {args.max_fill_s:g}s; measured at "
                                        f"t={end_at:.1f}s anyway")
                    say("stalled: " + result.notes[-1])
            await _sleep_until(t0, sample.t + args.interval_s)
        result.final = sampler.take()
        result.end_at = end_at
        result.hold_s = result.final.t
        progress("stalled", result.final, n, baseline)
        result.after_check = await normal_request(stack.gateway.url)
        say(f"stalled: a normal request afterwards: {result.after_check}")
        # With the clients still connected, how long the kernel keeps what the gateway let go of.
        watch_until = result.final.t + args.orphan_watch_s
        sample = result.final
        while sample.orphans and sample.t < watch_until:
            await _sleep_until(t0, sample.t + 1.0)
            sample = sampler.take()
            if tick % args.progress_every == 0:
                progress("orphans", sample, n, baseline)
            tick += 1
        if not sample.orphans:
            result.orphans_gone_at = sample.t
        result.watch_end = sample
        for stream in streams.values():
            stream.close()
        await asyncio.sleep(2.0)
        result.closed = sampler.take()
        progress("closed", result.closed, n, baseline)
    result.stall_times = sorted(sampler.last_growth.values())
    result.drop_times = sorted(sampler.dropped_at.values())
    result.drop_after_stall = sorted(sampler.dropped_at[p] - sampler.last_growth[p] for p in sampler.dropped_at
                                     if p in sampler.last_growth)
    result.peak_queue_per_stream = sorted(sampler.peak_queue.values())
    return result


async def live_phase(args: argparse.Namespace, log_dir: Path, hold_s: float) -> PhaseResult:
    n = args.streams
    with start_stack(args, log_dir, "live") as stack:
        assert stack.gateway.pid is not None
        await warm_up(stack.gateway.url, args.warmup_requests)
        await asyncio.sleep(1.0)
        baseline = rss_kib(stack.gateway.pid)
        say(f"live: gateway {stack.gateway.url} (pid {stack.gateway.pid}) baseline RSS {baseline / 1024:.1f} MiB; "
            f"{n} streams read normally for {hold_s:.0f}s")
        t0 = time.monotonic()
        streams = await open_streams(stack.gateway_port, n, stalled=False, rcvbuf=0, max_tokens=args.max_tokens)
        opened_s = time.monotonic() - t0
        sampler = Sampler(stack, streams, t0)
        result = PhaseResult("live", n, baseline, sampler.samples, opened_s, hold_s)
        tick = 0
        while time.monotonic() - t0 < hold_s:
            sample = sampler.take()
            if tick % args.progress_every == 0:
                progress("live", sample, n, baseline)
            tick += 1
            await _sleep_until(t0, sample.t + args.interval_s)
        result.final = sampler.take()
        progress("live", result.final, n, baseline)
        result.after_check = await normal_request(stack.gateway.url)
        lost = sum(s.lost for s in streams.values())
        if lost:
            result.notes.append(f"{lost} live streams were closed before the end of the hold")
        for stream in streams.values():
            stream.close()
        await asyncio.sleep(2.0)
        result.closed = sampler.take()
        progress("closed", result.closed, n, baseline)
        result.peak_queue_per_stream = sorted(sampler.peak_queue.values())
    return result


# --- report ----------------------------------------------------------------------------------------------------


def _kib(value: float) -> str:
    return f"{value / 1024:,.1f} KiB"


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def _spread(values: Sequence[float], unit: str = "s", digits: int = 1) -> str:
    if not values:
        return "–"
    return (f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f} {unit}")


def peak_per_stream_kib(result: PhaseResult) -> float:
    return max(s.rss_kib - result.baseline_kib for s in result.samples) / result.streams


def _rate_per_s(result: PhaseResult, attr: str, since: float) -> float:
    window = [s for s in result.samples if s.t >= since]
    if len(window) < 2 or window[-1].t <= window[0].t:
        return 0.0
    return float(getattr(window[-1], attr) - getattr(window[0], attr)) / (window[-1].t - window[0].t)


def _at(result: PhaseResult, t: float) -> Sample:
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


def _gateway_cpu(result: PhaseResult) -> float:
    first, last = result.samples[0], result.final or result.samples[-1]
    return (last.gateway_cpu_s - first.gateway_cpu_s) / max(last.t - first.t, 1e-9)


def _git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"{head}{' with local changes' if dirty else ''}"


def _orphans_later(result: PhaseResult, args: argparse.Namespace) -> str:
    end = result.watch_end or result.final
    assert end is not None
    if result.orphans_gone_at is not None:
        return f"all gone at t={result.orphans_gone_at:.1f} s"
    return f"{end.orphans} still at t={end.t:.1f} s ({args.orphan_watch_s:g} s later, the clients still connected)"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render(args: argparse.Namespace, command: str, stalled: PhaseResult, live: PhaseResult | None,
           steal: float | None, took_s: float, png: Path | None) -> str:
    n = args.streams
    final, closed = stalled.final, stalled.closed
    assert final is not None and closed is not None
    per_stream = peak_per_stream_kib(stalled)
    peak_queue = max(s.send_queue for s in stalled.samples)
    check = stalled.after_check
    lines = [
        "# Clients that stop reading", "", "```", command, "```", "",
        f"On {_git_revision()}, {time.strftime('%Y-%m-%d %H:%M')}; {took_s / 60:.1f} min; CPU time taken by the VM "
        f"host (steal) during the run: {'unknown' if steal is None else f'{steal:.1%}'}. Gateway "
        f"(`specgate gateway`, SPECGATE_SSE_SEND_TIMEOUT_S={args.send_timeout_s:g}, SPECGATE_REQUEST_LOG=false, "
        f"SPECGATE_MAX_CONCURRENCY={gateway_env(args)['SPECGATE_MAX_CONCURRENCY']}, other settings default: "
        f"client_send_buffer_bytes 128 KiB, client_write_buffer_bytes 16 KiB) on core {args.gateway_cpu or 'any'}; "
        f"fake engine (`specgate fake-engine {' '.join(shlex.quote(a) for a in engine_argv(args, 0)[4:])}`, "
        f"{args.token_chars}-character token text, ~{args.token_chars + 200} bytes per event) and this process "
        f"on core {args.client_cpu or 'any'}. Each phase starts a fresh engine and gateway; the RSS baseline is "
        f"read after {args.warmup_requests} streamed requests read to the end. {n} stalled clients: raw TCP, "
        f"SO_RCVBUF {args.rcvbuf} set before connecting, `stream: true`, max_tokens {args.max_tokens}, then no "
        f"reads. Readings every {args.interval_s:g} s; times are from the first connection.",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        f"| gateway memory per stalled reader beyond the kernel's buffers ≤ {GOAL_KIB_PER_STREAM:g} KiB | "
        f"{per_stream:.1f} KiB (peak RSS − baseline) / {n} | {_verdict(per_stream <= GOAL_KIB_PER_STREAM)} |",
        f"| client sockets the gateway holds after the deadline (t={final.t:.1f} s): 0 | {final.held} of {n} | "
        f"{_verdict(final.held == 0)} |",
        f"| worker requests still running after the deadline: 0 | {final.engine_running:.0f} | "
        f"{_verdict(final.engine_running == 0)} |",
        f"| the gateway serves a normal streamed request afterwards | HTTP {check.get('status')}, "
        f"{check.get('events')} events, [DONE] {'yes' if check.get('done') else 'no'}, "
        f"{check.get('seconds', 0) * 1000:.0f} ms | {_verdict(bool(check.get('ok')))} |",
        f"| … and their TCP connections closed in the kernel: 0 | {final.orphans} left behind (orphaned, "
        f"{_mib(final.orphan_queue)} still queued), {_orphans_later(stalled, args)} | "
        f"{_verdict(final.orphans == 0)} |",
        "",
    ]
    header = "| | stalled readers |" + (" live readers (read normally, same time) |" if live else "")
    lines += [header, "|---|---|" + ("---|" if live else "")]

    def row(label: str, stalled_cell: str, live_cell: str | None = None) -> None:
        lines.append(f"| {label} | {stalled_cell} |" + (f" {live_cell or '–'} |" if live else ""))

    row("streams opened in", f"{stalled.opened_s:.2f} s", f"{live.opened_s:.2f} s" if live else None)
    row("gateway RSS baseline", _mib(stalled.baseline_kib * 1024), _mib(live.baseline_kib * 1024) if live else None)
    peak_rss = max(s.rss_kib for s in stalled.samples)
    row("peak RSS − baseline", _mib((peak_rss - stalled.baseline_kib) * 1024),
        _mib((max(s.rss_kib for s in live.samples) - live.baseline_kib) * 1024) if live else None)
    row("**peak (RSS − baseline) per stream**", f"**{per_stream:.1f} KiB**",
        f"**{peak_per_stream_kib(live):.1f} KiB**" if live else None)
    row("RSS − baseline per stream at the end of the hold", f"{(final.rss_kib - stalled.baseline_kib) / n:.1f} KiB",
        f"{(live.final.rss_kib - live.baseline_kib) / n:.1f} KiB" if live and live.final else None)
    row("peak kernel send queue to the clients, total", _mib(peak_queue),
        _mib(max(s.send_queue for s in live.samples)) if live else None)
    row("peak kernel send queue per stream (min / median / max)",
        _spread([q / 1024 for q in stalled.peak_queue_per_stream], "KiB"),
        _spread([q / 1024 for q in live.peak_queue_per_stream], "KiB") if live else None)
    peak_unread = max(s.upstream_unread for s in stalled.samples)
    row("peak bytes unread in the gateway's upstream sockets (kernel), total", _mib(peak_unread),
        _mib(max(s.upstream_unread for s in live.samples)) if live else None)
    row("peak bytes in the engine's send queues to the gateway (kernel), total",
        _mib(max(s.engine_queue for s in stalled.samples)),
        _mib(max(s.engine_queue for s in live.samples)) if live else None)
    row("streams stalled: send queue stopped growing (first / median / last)", _spread(stalled.stall_times))
    if stalled.t_stall is not None:
        at_stall = _at(stalled, stalled.t_stall)
        row(f"RSS − baseline per stream when the last send queue stopped growing (t={at_stall.t:.1f} s)",
            f"{(at_stall.rss_kib - stalled.baseline_kib) / n:.1f} KiB")
    row("events the engine wrote per stream", f"{engine_events_per_stream(stalled):,.0f}",
        f"{engine_events_per_stream(live):,.0f}" if live else None)
    row("gateway let go of the sockets (first / median / last)", _spread(stalled.drop_times))
    row("… after its stream stalled (min / median / max)", _spread(stalled.drop_after_stall))
    row(f"sockets the gateway holds at t={final.t:.1f} s", f"{final.held}", f"{live.final.held}" if live and
        live.final else None)
    row(f"orphaned kernel sockets at t={final.t:.1f} s (no fd; states)",
        f"{final.orphans} ({_mib(final.orphan_queue)} queued; "
        f"{', '.join(f'{k} {v}' for k, v in sorted(final.states.items())) or 'none'})")
    end = stalled.watch_end or final
    if not final.orphans:
        gone = "none were left"
    elif stalled.orphans_gone_at is not None:
        gone = f"t={stalled.orphans_gone_at:.1f} s"
    else:
        gone = (f"not by t={end.t:.1f} s: {end.orphans} left ({_mib(end.orphan_queue)} queued), then the clients "
                f"closed")
    row("orphaned kernel sockets gone (clients still connected)", gone)
    row("engine running requests at the end of the hold", f"{final.engine_running:.0f}",
        f"{live.final.engine_running:.0f}" if live and live.final else None)
    row("engine running requests 2 s after the clients closed", f"{closed.engine_running:.0f}",
        f"{live.closed.engine_running:.0f}" if live and live.closed else None)
    row("gateway CPU (share of its core over the hold)", f"{_gateway_cpu(stalled):.0%}",
        f"{_gateway_cpu(live):.0%}" if live else None)
    if live:
        settle = live.hold_s / 2
        offered = n * 1000 / args.gap_ms
        row("delivered to the clients (second half of the hold)", "0",
            f"{_rate_per_s(live, 'client_bytes', settle) / 2**20:.1f} MiB/s, "
            f"{_rate_per_s(live, 'engine_events', settle):,.0f} engine events/s (offered {offered:,.0f})")
        per_event = rss_bytes_per_event(live, settle)
        growth = _rate_per_s(live, "rss_kib", settle) / n
        row("RSS growth per stream (second half of the hold)",
            f"{_rate_per_s(stalled, 'rss_kib', (stalled.t_stall or 0) + 2) / n:.2f} KiB/s (after the stall)",
            f"{growth:.2f} KiB/s" + ("" if per_event is None else f", {per_event:.0f} bytes per event relayed"))
        fit = live_fit(live)
        if fit is not None:
            row("live: RSS − baseline per stream = fixed + per event × events (least squares over the hold)", "–",
                f"{fit[0]:.1f} KiB + {fit[1]:.0f} bytes × events")
    lines += ["", "How to read it. Per stream the settings bound the gateway's userland bytes at 16 KiB queued for the "
              "client (client_write_buffer_bytes) + 32 KiB unread from the worker (the upstream read high-water) = "
              "48 KiB; each limit is checked after a write or a read, so each can be passed by one relayed write or "
              "one network read. RSS also holds each stream's fixed state and whatever grows with the events "
              "relayed (the live column's per-event figure), up to the moment the stream stalled. The kernel send "
              "buffer (128 KiB requested, doubled by Linux) is outside RSS: it is the send queue above. A stream "
              "stalls once all of these and the upstream socket's buffers are full; the send timeout then counts "
              "from the write that waits. A socket the gateway drops with a plain close keeps its queued bytes in "
              "the kernel (FIN_WAIT1) for as long as the client answers the zero-window probes."]
    for note in [*stalled.notes, *(live.notes if live else [])]:
        lines.append(f"\nNote: {note}")
    if png is not None:
        lines += ["", f"![RSS, send queue, sockets and running requests over time]({png.name})"]
    return "\n".join(lines) + "\n"


def plot(stalled: PhaseResult, live: PhaseResult | None, args: argparse.Namespace, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    series = [(stalled, "stalled", "tab:red")] + ([(live, "live", "tab:blue")] if live else [])
    panels: list[tuple[Any, str, Callable[[PhaseResult, Sample], float]]] = [
        (axes[0][0], "gateway RSS − baseline (MiB)", lambda r, s: (s.rss_kib - r.baseline_kib) / 1024),
        (axes[0][1], "kernel send queue to the clients (MiB)", lambda r, s: s.send_queue / 2**20),
        (axes[1][0], "client sockets the gateway holds", lambda r, s: s.held),
        (axes[1][1], "engine running requests", lambda r, s: s.engine_running),
    ]
    for axis, title, value in panels:
        for result, label, color in series:
            points = [*result.samples]
            axis.plot([s.t for s in points], [value(result, s) for s in points], color=color, label=label)
        axis.set_title(title, fontsize=10)
        if stalled.t_stall is not None:
            axis.axvline(stalled.t_stall, color="grey", linestyle=":", label="last stream stalled")
            axis.axvline(stalled.t_stall + args.send_timeout_s, color="black", linestyle="--",
                         label="+ send timeout")
    axes[0][0].axhline(GOAL_KIB_PER_STREAM * args.streams / 1024, color="green", linestyle=":",
                       label=f"goal: {GOAL_KIB_PER_STREAM:g} KiB x {args.streams}")
    axes[0][1].plot([s.t for s in stalled.samples], [s.orphan_queue / 2**20 for s in stalled.samples],
                    color="tab:orange", linestyle="--", label="stalled: of it, orphaned (no fd)")
    axes[1][0].plot([s.t for s in stalled.samples], [s.orphans for s in stalled.samples], color="tab:orange",
                    linestyle="--", label="stalled: orphaned kernel sockets")
    for axis in axes[1]:
        axis.set_xlabel("seconds since the streams opened")
    for axis in axes.flat:
        axis.legend(fontsize=7)
    fig.suptitle(f"{args.streams} clients that stop reading vs {args.streams} that read "
                 f"(send timeout {args.send_timeout_s:g} s)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- main ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stalled_readers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=300, help="clients that stop reading (and, live, that read)")
    p.add_argument("--send-timeout-s", type=float, default=20.0, help="SPECGATE_SSE_SEND_TIMEOUT_S")
    p.add_argument("--out", type=Path, default=RESULTS / "stalled-readers.md", help="report; the plot goes beside it")
    p.add_argument("--rcvbuf", type=int, default=4096, help="SO_RCVBUF of the stalled clients")
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--gap-ms", type=float, default=10.0)
    p.add_argument("--output-len", type=int, default=100_000, help="the engine's output length per request")
    p.add_argument("--max-tokens", type=int, default=100_000)
    p.add_argument("--token-chars", type=int, default=256, help="characters of text per token (event size)")
    p.add_argument("--warmup-requests", type=int, default=6,
                   help="streamed requests read to the end before the baseline")
    p.add_argument("--interval-s", type=float, default=0.5, help="time between readings")
    p.add_argument("--progress-every", type=int, default=4, help="print every this many readings")
    p.add_argument("--quiet-s", type=float, default=2.0, help="no send queue grew this long: the streams stalled")
    p.add_argument("--max-fill-s", type=float, default=120.0, help="give up waiting for the stall after this long")
    p.add_argument("--margin-s", type=float, default=10.0, help="measure this long after stall + send timeout")
    p.add_argument("--orphan-watch-s", type=float, default=180.0,
                   help="then watch orphaned kernel sockets this long at most (clients still connected)")
    p.add_argument("--no-live", action="store_true", help="skip the comparison with readers that read")
    p.add_argument("--gateway-cpu", default="0", help="core for the gateway ('' = no pinning)")
    p.add_argument("--client-cpu", default="1", help="core for the fake engine and this process")
    p.add_argument("--log-dir", type=Path, help="process logs (default: a temporary directory)")
    p.add_argument("--no-plot", action="store_true")
    return p


async def run(args: argparse.Namespace, log_dir: Path) -> tuple[PhaseResult, PhaseResult | None]:
    stalled = await stalled_phase(args, log_dir)
    live = None if args.no_live else await live_phase(args, log_dir, stalled.hold_s)
    return stalled, live


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.stalled_readers", *argv])
    raise_open_file_limit()
    pin_self(args.client_cpu or None)  # this process shares the engine's core
    gc.collect()
    gc.freeze()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="stalled-readers-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    say(f"process logs in {log_dir}")
    started, steal_before = time.monotonic(), host_steal()
    stalled, live = uvloop.run(run(args, log_dir))
    steal = steal_share_since(steal_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = None if args.no_plot else plot(stalled, live, args, args.out.with_suffix(".png"))
    report = render(args, command, stalled, live, steal, time.monotonic() - started, png)
    args.out.write_text(report)
    print(report)
    say("wrote " + ", ".join(str(p) for p in (args.out, png) if p is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
