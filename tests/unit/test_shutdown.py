"""SIGTERM on a real gateway process: it keeps answering while it drains, then exits 0."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.support import gateway_process
from tests.unit.fakes import STREAM, SlowWorker, serve_in_thread, vllm_stream, wait_until


@pytest.fixture
def worker_url() -> Iterator[str]:
    # About 3 s of stream: it outlives the checks below and ends well inside the grace.
    with serve_in_thread(SlowWorker(vllm_stream([1] * 60), gap_s=0.05)) as url:
        yield url


def test_sigterm_drains_answering_new_work_with_503_and_exits_0(worker_url: str) -> None:
    with gateway_process(worker_url, shutdown_grace_s="20") as gateway:
        url = gateway.url
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
            gateway.process.send_signal(signal.SIGTERM)

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
        assert gateway.process.wait(30) == 0


def test_sigterm_with_nothing_open_exits_0_at_once(worker_url: str) -> None:
    with gateway_process(worker_url, shutdown_grace_s="60") as gateway:
        gateway.process.send_signal(signal.SIGTERM)
        # Well inside the 60 s grace: nothing was open to wait for.
        assert gateway.process.wait(20) == 0
