"""Benchmark harness: start real workers and the gateway as separate pinned processes, run `vllm bench serve`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from engine.demo_models import default_models_dir
from engine.launch import WorkerProcess, say
from engine.model_builds import build, builds_for
from engine.profiles import find_profile, render

RESULTS = Path(__file__).parent / "results"


def pinned(core: int | None, argv: list[str]) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", str(core), *argv]


@contextlib.contextmanager
def worker(
    profile_name: str, port: int, core: str | None, log_dir: Path, threads: int | None = None
) -> Iterator[str]:
    """One vLLM worker for the profile; `core` is its OpenMP binding ("0", "0|1", "nobind", ...)."""
    with worker_process(profile_name, port, core, log_dir, threads) as process:
        yield process.url


@contextlib.contextmanager
def worker_process(
    profile_name: str, port: int, core: str | None, log_dir: Path, threads: int | None = None
) -> Iterator[WorkerProcess]:
    """As `worker`, yielding the process handle (for benchmarks that kill it)."""
    profile = find_profile(profile_name)
    models_dir = default_models_dir()
    build(builds_for(profile), models_dir)
    command = render(profile, host="127.0.0.1", port=port, models_dir=models_dir, cpu_bind=core,
                     cpu_threads=threads)
    process = WorkerProcess(command, port, log_dir / f"{profile_name}-{port}.log", name=f"{profile_name}:{port}")
    process.start()
    try:
        process.wait_ready(600, say)
        yield process
    finally:
        process.stop()


def wait_ready(url: str, timeout_s: float, alive: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or alive.poll() is not None:
            raise RuntimeError(f"{url} did not become ready")
        time.sleep(0.2)


@contextlib.contextmanager
def gateway(
    worker_urls: Sequence[str], port: int, core: int | None, log_dir: Path, extra: Sequence[str] = ()
) -> Iterator[str]:
    """The gateway in its own process, as users run it (request log off: it is not what is measured)."""
    argv = [sys.executable, "-m", "gateway.cli", "gateway", "--workers", ",".join(worker_urls),
            "--port", str(port), "--log-level", "warning", *extra]
    env = {**os.environ, "SPECGATE_REQUEST_LOG": "false"}
    with (log_dir / f"gateway-{port}.log").open("wb") as log:
        process = subprocess.Popen(pinned(core, argv), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 60, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def run_vllm_bench(base_url: str, bench_args: Sequence[str], out: Path, core: int | None) -> dict[str, float]:
    """`vllm bench serve` against base_url; returns its saved result JSON."""
    argv = [
        sys.executable, "-m", "loadtest.vllm_bench", "serve", "--base-url", base_url, *bench_args,
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]
    say(f"vllm bench serve -> {base_url} {' '.join(bench_args)}")
    subprocess.run(pinned(core, argv), check=True)
    result: dict[str, float] = json.loads(out.read_text())
    return result


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
        return text
