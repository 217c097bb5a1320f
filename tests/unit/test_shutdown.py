"""SIGTERM on a real gateway process: it keeps answering while it drains, then exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.unit.fakes import STREAM, SlowWorker, free_port, serve_in_thread, vllm_stream, wait_until


@pytest.fixture
def worker_url() -> Iterator[str]:
    # About 3 s of stream: it outlives the checks below and ends well inside the grace.
    with serve_in_thread(SlowWorker(vllm_stream([1] * 60), gap_s=0.05)) as url:
        yield url


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_drains_answering_new_work_with_503_and_exits_0(worker_url: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SPECGATE_SHUTDOWN_GRACE_S": "20", "SPECGATE_REQUEST_LOG": "false"}
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "gateway", "--workers", worker_url, "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: _ready(url), timeout_s=60), "the gateway never became ready"
        with (
            httpx.Client(base_url=url, timeout=30) as idle_keep_alive,
            httpx.Client(base_url=url, timeout=30) as streamer,
        ):
            assert idle_keep_alive.get("/health").status_code == 200  # its connection now waits, idle
            events: list[str] = []
            first_event = threading.Event()

            def read_stream() -> None:
                with streamer.stream("POST", "/v1/chat/completions", json=STREAM) as stream:
                    for line in stream.iter_lines():
                        if line.startswith("data:"):
                            events.append(line)
                            first_event.set()

            reader = threading.Thread(target=read_stream)
            reader.start()
            assert first_event.wait(30), "the stream never started"
            gateway.send_signal(signal.SIGTERM)

            # Still answering, on a new connection and on the idle keep-alive one.
            assert wait_until(lambda: httpx.get(url + "/ready", timeout=5).status_code == 503, timeout_s=10)
            refused = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers["connection"] == "close"
            again = idle_keep_alive.post("/v1/chat/completions", json=STREAM)
            assert again.status_code == 503 and again.headers["connection"] == "close"

            reader.join(30)
        assert events[-1] == "data: [DONE]", events[-3:]
        assert len(events) > 60
        assert gateway.wait(30) == 0
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()


def test_sigterm_with_nothing_open_exits_0_at_once(worker_url: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "gateway", "--workers", worker_url, "--port", str(port)],
        env={**os.environ, "SPECGATE_SHUTDOWN_GRACE_S": "60"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: _ready(url), timeout_s=60)
        gateway.send_signal(signal.SIGTERM)
        # Well inside the 60 s grace: nothing was open to wait for.
        assert gateway.wait(20) == 0
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
