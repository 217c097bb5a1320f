"""Process plumbing: the open-file limit (the load generator and the fake engine), and for benchmarks/ free
loopback ports, CPU pinning, health waits and CPU time."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import time
from pathlib import Path

import httpx


def pin_self(cpu: str | None) -> None:
    """Run this process (a load generator) on `cpu`, where the fake engine runs too; '' or None: anywhere."""
    if cpu and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(cpu)})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    """`argv` under `taskset -c cpu`, or unchanged when no core is given or taskset is missing."""
    return ["taskset", "-c", cpu, *argv] if cpu and shutil.which("taskset") else argv


def wait_healthy(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not healthy after {timeout_s}s")


def process_cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a running process, from /proc (it is not a waited-for child yet)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process, to the nanosecond where the kernel keeps schedstat.

    /proc/<pid>/stat counts whole clock ticks (10 ms), so a short round of a fast gateway can read as 0;
    each thread's schedstat holds its run time in nanoseconds. Threads that ended are not counted there,
    which the gateways measured here (long-lived event-loop and worker threads) do not mind.
    """
    if not Path(f"/proc/{pid}/schedstat").exists():
        return sum(process_cpu_split(pid))
    run_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        # A thread may end between the listing and the read.
        with contextlib.suppress(OSError, IndexError, ValueError):
            run_ns += int((task / "schedstat").read_text().split()[0])
    return run_ns / 1e9


def children_cpu_seconds() -> float:
    """User + system CPU of all children waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: a thousand streams need a thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, 65536) if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
