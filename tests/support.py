"""Helpers shared by unit and integration tests: real servers in threads and polling with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports (what `specgate up --worker-port` takes)."""
    for _ in range(100):
        first = free_port()
        probes = []
        try:
            for offset in range(count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", first + offset))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no run of {count} free ports")


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int | None = None) -> Iterator[str]:
    """Run an ASGI app under a real uvicorn on loopback; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """`wait_until` for async tests: polls without blocking the loop; generous, it returns once the change shows."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def replace_by_rename(path: Path, text: str) -> None:
    """Replace a file as editors and Kubernetes ConfigMaps do: a new file renamed over it."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_text(text)
    os.replace(temporary, path)


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


@dataclass
class GatewayProcess:
    """`specgate gateway` as users run it, in its own process."""

    url: str
    process: subprocess.Popen[bytes]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


@contextlib.contextmanager
def gateway_process(worker_url: str, **settings: str) -> Iterator[GatewayProcess]:
    """The gateway in front of `worker_url`, with `settings` as SPECGATE_* variables, ready; killed at the end
    if it has not exited by then."""
    port = free_port()
    env = {**os.environ, "SPECGATE_REQUEST_LOG": "false",
           **{f"SPECGATE_{name.upper()}": value for name, value in settings.items()}}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "gateway", "--workers", worker_url, "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    gateway = GatewayProcess(f"http://127.0.0.1:{port}", process)
    try:
        if not wait_until(gateway.ready, timeout_s=60):
            raise RuntimeError("the gateway never became ready")
        yield gateway
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
