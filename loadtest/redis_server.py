"""A real `redis-server` for tests and benchmarks: started on a free loopback port, ready when it answers PING,
killed at the end.

`running_redis()` yields its URL; `redis_server()` yields the URL and the process, for tests that kill or freeze
it. Both raise `RedisNotInstalled` when `redis-server` is not on PATH (tests skip on it).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

from loadtest.procs import free_port

READY_WITHIN_S = 10.0


class RedisNotInstalled(RuntimeError):
    """No `redis-server` on PATH (Debian: apt-get install redis-server)."""


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisNotInstalled("redis-server is not on PATH (Debian: apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryFile() as log:
        command = [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + READY_WITHIN_S
            while not _answers_ping(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"redis-server on port {port} did not start: {log.read().decode()[-2000:]}")
                time.sleep(0.02)  # a poll interval under a deadline, not a wait for readiness
            yield f"redis://127.0.0.1:{port}/0", process
        finally:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def running_redis() -> Iterator[str]:
    with redis_server() as (url, _):
        yield url
