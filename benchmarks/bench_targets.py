"""Benchmark targets as pinned subprocesses: the fake engine, specgate (this checkout's or another's), peers.

Each `start_*` is a context manager yielding a `Target` (name, base URL, pid for RSS and CPU readings); it
stops the process (and anything it spawned, by its own process group) on exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import peers
from loadtest.procs import free_port, pinned


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    pid: int | None  # None for "direct": the engine is not what is measured
    note: str = ""


def _wait(url: str, process: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{url} did not come up (exit {process.poll()}); log tail:\n{tail}")
        time.sleep(0.1)


@contextlib.contextmanager
def run_process(name: str, argv: Sequence[str], health_url: str, cpu: str | None, log_dir: Path,
                env: dict[str, str] | None = None, timeout_s: float = 90.0) -> Iterator[int]:
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(pinned(cpu, list(argv)), stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        _wait(health_url, process, timeout_s, log)
        yield process.pid
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group this process leads (it may have spawned workers), SIGKILL after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def engine_timing_args(ttft_ms: float, gap_ms: float, output_len: int) -> list[str]:
    """`specgate fake-engine` flags for a timing, with the fixed 32-token prompts every benchmark uses."""
    return ["--ttft-ms", f"{ttft_ms:g}", "--gap-ms", f"{gap_ms:g}", "--output-len", str(output_len),
            "--prompt-tokens", "32"]


@contextlib.contextmanager
def start_engine(engine_args: Sequence[str], cpu: str | None, log_dir: Path) -> Iterator[Target]:
    """The fake vLLM worker; `engine_args` are `specgate fake-engine` flags (timing, output length, faults)."""
    port = free_port()
    argv = [sys.executable, "-m", "loadtest.fake_engine", "--port", str(port), *engine_args]
    url = f"http://127.0.0.1:{port}"
    with run_process(f"engine-{port}", argv, url + "/health", cpu, log_dir) as pid:
        yield Target("direct", url, pid)


@contextlib.contextmanager
def start_specgate(upstream: str, cpu: str | None, log_dir: Path, checkout: Path | None = None) -> Iterator[Target]:
    """specgate as users run it (`gateway.cli gateway`); with `checkout`, the gateway of that other checkout
    (a git worktree of an earlier commit, say), for a before/after comparison in one run."""
    port = free_port()
    argv = [sys.executable, "-m", "gateway.cli", "gateway", "--workers", upstream, "--port", str(port),
            "--log-level", "warning"]
    env = {"SPECGATE_REQUEST_LOG": "false"}
    name = "specgate"
    if checkout is not None:
        if not (checkout / "gateway" / "cli.py").is_file():
            raise ValueError(f"no gateway in {checkout}")
        env["PYTHONPATH"] = str(checkout.resolve())
        name = f"specgate@{checkout.name}"
    url = f"http://127.0.0.1:{port}"
    label = f"{name.replace('@', '-')}-{port}"
    with run_process(label, argv, url + "/ready", cpu, log_dir, env) as pid:
        yield Target(name, url, pid)


@contextlib.contextmanager
def start_litellm(upstream: str, cpu: str | None, log_dir: Path) -> Iterator[Target]:
    port = free_port()
    launch = peers.litellm_launch(port, upstream, log_dir)
    url = f"http://127.0.0.1:{port}"
    with run_process(f"litellm-{port}", launch.argv, url + launch.health_path, cpu, log_dir, launch.env, 180) as pid:
        yield Target("litellm", url, pid, note=f"litellm {peers.peer('litellm').version()}")


@contextlib.contextmanager
def start_vllm_router(upstream: str, cpu: str | None, log_dir: Path) -> Iterator[Target]:
    port = free_port()
    launch = peers.vllm_router_launch(port, upstream, free_port())
    url = f"http://127.0.0.1:{port}"
    with run_process(f"vllm-router-{port}", launch.argv, url + launch.health_path, cpu, log_dir, launch.env) as pid:
        yield Target("vllm-router", url, pid, note=f"vllm-router {peers.peer('vllm-router').version()}")


@contextlib.contextmanager
def start_bare_relay(upstream: str, cpu: str | None, log_dir: Path) -> Iterator[Target]:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.bare_relay", "--workers", upstream, "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with run_process(f"bare-relay-{port}", argv, url + "/health", cpu, log_dir) as pid:
        yield Target("bare-relay", url, pid, note="bare-relay: the floor of a Python relay (benchmarks/bare_relay.py)")


def start_target(name: str, upstream: str, cpu: str | None, log_dir: Path) -> contextlib.AbstractContextManager[Target]:
    """`specgate`, `specgate@DIR` (the gateway of another checkout), `litellm`, `vllm-router` or `bare-relay` in
    front of `upstream`."""
    if name == "specgate":
        return start_specgate(upstream, cpu, log_dir)
    if name.startswith("specgate@"):
        return start_specgate(upstream, cpu, log_dir, Path(name.split("@", 1)[1]))
    if name == "litellm":
        return start_litellm(upstream, cpu, log_dir)
    if name == "vllm-router":
        return start_vllm_router(upstream, cpu, log_dir)
    if name == "bare-relay":
        return start_bare_relay(upstream, cpu, log_dir)
    raise ValueError(f"unknown target {name!r}")


def missing_peer(name: str, root: Path = peers.PEERS_DIR) -> str | None:
    """Why a peer target cannot run (its venv is missing), or None when it can."""
    if name in peers.NAMES and not peers.peer(name).available(root):
        venv = peers.peer(name).venv_dir(root)
        return f"{name} skipped: no venv at {venv} (python -m benchmarks.peers install {name})"
    return None


def rss_kib(pid: int) -> int:
    """VmRSS of a process plus its descendants (a peer may fork workers), in KiB; 0 once it is gone."""
    total = 0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def tree_cpu_seconds(pid: int) -> float:
    from loadtest.procs import process_cpu_seconds

    total = 0.0
    for member in _tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += process_cpu_seconds(member)
    return total


def _tree(pid: int) -> list[int]:
    members, todo = [], [pid]
    while todo:
        current = todo.pop()
        members.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children") if Path(f"/proc/{current}").exists() else ():
            with contextlib.suppress(OSError):
                todo.extend(int(child) for child in task.read_text().split())
    return members
