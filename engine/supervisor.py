"""Runs N workers (each on its own port, and core when there are enough) and restarts any that crash."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from engine.launch import EngineStartError, WorkerProcess, say
from engine.profiles import EngineProfile, render

RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
START_TIMEOUT_S = 600.0


NO_BINDING = "nobind"


def _oversubscribed(profile: EngineProfile, workers: int) -> bool:
    return workers * profile.tensor_parallel_size >= (os.cpu_count() or 1)


def cpu_binding(index: int, profile: EngineProfile, workers: int) -> str | None:
    """On CPU, give each worker its own cores while one core is left for everything else.

    Workers pinned to every core leave their API servers, engine cores and the gateway to queue behind the
    pinned threads, so an idle worker beside a busy one answers late; with no core to spare, workers run
    unpinned with their share of OpenMP threads (README.md, "vLLM CPU workers: what we measured").
    """
    if profile.device != "cpu":
        return None
    cores = os.cpu_count() or 1
    if profile.cpu_threads_bind is not None and workers == 1:
        return profile.cpu_threads_bind
    if _oversubscribed(profile, workers):
        return NO_BINDING
    ranks = profile.tensor_parallel_size
    slot = (index * ranks) % cores
    return "|".join(str((slot + rank) % cores) for rank in range(ranks))


def cpu_threads(profile: EngineProfile, workers: int) -> int | None:
    """Compute threads per unpinned worker: its share of the cores, so OpenMP does not oversubscribe them."""
    if profile.device != "cpu" or not _oversubscribed(profile, workers):
        return None
    return max(1, (os.cpu_count() or 1) // (workers * profile.tensor_parallel_size))


class Supervisor:
    """Starts the workers, restarts crashed ones with backoff, and stops them all on request."""

    def __init__(
        self,
        profile: EngineProfile,
        workers: int,
        base_port: int,
        models_dir: Path,
        log_dir: Path,
        progress: Callable[[str], None] = say,
    ) -> None:
        self.profile = profile
        self.progress = progress
        self.processes = [
            WorkerProcess(
                render(
                    profile, host="127.0.0.1", port=base_port + index, models_dir=models_dir,
                    cpu_bind=cpu_binding(index, profile, workers), cpu_threads=cpu_threads(profile, workers),
                ),
                base_port + index,
                log_dir / f"worker-{index}.log",
                name=f"worker-{index}",
            )
            for index in range(workers)
        ]
        self.restarts = [0] * workers
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def urls(self) -> list[str]:
        return [process.url for process in self.processes]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start every worker and wait for all; on any failure stop the rest and raise."""
        try:
            for process in self.processes:
                self.progress(f"starting {process.name} on :{process.port} (log: {process.log_path})")
                process.start()
            for process in self.processes:
                took = process.wait_ready(timeout_s, self.progress)
                self.progress(f"{process.name} ready at {process.url} after {took:.0f}s")
        except BaseException:
            self.stop()
            raise
        self._watcher = threading.Thread(target=self._watch, name="specgate-supervisor", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for index, process in enumerate(self.processes):
                if not process.alive() and not self._stopping.is_set():
                    self._restart(index, process)

    def _restart(self, index: int, process: WorkerProcess) -> None:
        code = process.process.returncode if process.process else None
        delay = RESTART_BACKOFF_S[min(self.restarts[index], len(RESTART_BACKOFF_S) - 1)]
        self.restarts[index] += 1
        self.progress(f"{process.name} exited (code {code}); restart {self.restarts[index]} in {delay:.0f}s")
        process.stop()
        if self._stopping.wait(delay):
            return
        try:
            process.start()
            took = process.wait_ready(START_TIMEOUT_S, self.progress)
            self.progress(f"{process.name} back at {process.url} after {took:.0f}s")
            self.restarts[index] = 0
        except EngineStartError as exc:
            self.progress(f"{process.name} failed to restart: {exc}")

    def stop(self) -> None:
        self._stopping.set()
        for process in self.processes:
            process.stop()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
