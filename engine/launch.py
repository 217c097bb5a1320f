"""Starts one vLLM worker process, waits until it answers /health, and stops it with its children."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import httpx

from engine.profiles import WorkerCommand

STOP_GRACE_S = 15.0


class EngineStartError(RuntimeError):
    """A worker died or did not come up in time; carries the tail of its log."""


# An exception's own line ("pkg.SomeError: message"), as vLLM's processes log it under their ERROR prefix.
_EXCEPTION_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) ERROR [^\]]*\] )?(?:[\w.]+\.)?\w*(?:Error|Exception): ")


def _log_tail(path: Path, lines: int = 40) -> str:
    """The log's last lines, led by the first exception it records: vLLM's worker processes log the root cause
    well above the engine's closing traceback."""
    try:
        with path.open("r", errors="replace") as handle:
            tail: deque[str] = deque(maxlen=lines)
            first_error = None
            for line in handle:
                tail.append(line)
                if first_error is None and _EXCEPTION_LINE.match(line):
                    first_error = line
    except OSError:
        return "(no log)"
    text = "".join(tail)
    if first_error is not None and first_error not in tail:
        return f"first error: {first_error}...\n{text}"
    return text


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if the process that started it dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class WorkerProcess:
    """One vLLM worker: its own process group, so stopping it takes its engine-core children too."""

    def __init__(self, command: WorkerCommand, port: int, log_path: Path, name: str = "worker") -> None:
        self.command = command
        self.port = port
        self.log_path = log_path
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if not _port_free(self.port):
            raise EngineStartError(f"{self.name}: port {self.port} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = {**os.environ, **self.command.env}
        self.process = subprocess.Popen(
            self.command.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self, timeout_s: float = 1.0) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float, progress: Callable[[str], None] | None = None) -> float:
        """Poll /health until it answers; returns the seconds it took."""
        started = time.monotonic()
        last_report = started
        while True:
            elapsed = time.monotonic() - started
            if not self.alive():
                code = self.process.returncode if self.process else None
                raise EngineStartError(
                    f"{self.name} exited with code {code} while starting; last log lines "
                    f"({self.log_path}):\n{_log_tail(self.log_path)}"
                )
            if self.healthy():
                return elapsed
            if elapsed > timeout_s:
                self.stop()
                raise EngineStartError(
                    f"{self.name} did not answer /health within {timeout_s:.0f}s; last log lines "
                    f"({self.log_path}):\n{_log_tail(self.log_path)}"
                )
            if progress is not None and time.monotonic() - last_report >= 5:
                last_report = time.monotonic()
                progress(f"{self.name} on :{self.port} starting... {elapsed:.0f}s")
            time.sleep(0.25)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            self._reap_group()
            return
        self._signal_group(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            process.wait(timeout=grace_s)
        self._reap_group()

    def kill(self) -> None:
        """SIGKILL the worker's main process only, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def _reap_group(self) -> None:
        # Engine-core children outlive a killed parent; they share its process group.
        self._signal_group(signal.SIGKILL)


def say(message: str) -> None:
    print(f"[engine] {message}", file=sys.stderr, flush=True)
