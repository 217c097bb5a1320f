"""The readings, every interval: the gateway's RSS and CPU (benchmarks.bench_targets), the kernel's TCP table
(/proc/net/tcp: send and receive queues, states), the client sockets the gateway still holds (psutil) and the
engine's running requests and events (its /metrics, benchmarks.bench_measure)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil

from benchmarks.bench_measure import engine_counters, say
from benchmarks.bench_targets import rss_kib, tree_cpu_seconds
from benchmarks.stalled.clients import Client
from benchmarks.stalled.stack import Stack

TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
              "0B": "CLOSING"}


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
