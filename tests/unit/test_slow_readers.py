"""A client that stops reading: the gateway holds back the worker, then drops both past the send timeout."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.support import gateway_process
from tests.unit.fakes import MODEL, SlowWorker, chat_chunk, serve_in_thread, wait_until

# ~16 MB of stream, written as fast as the worker can: far more than every socket buffer on the way can hold.
BIG_EVENT = chat_chunk("x" * 4000, None)
EVENTS = 4000


@pytest.fixture
def flooding_worker() -> Iterator[tuple[SlowWorker, str]]:
    worker = SlowWorker([chat_chunk("", None, role="assistant"), *[BIG_EVENT] * EVENTS], gap_s=0)
    with serve_in_thread(worker) as url:
        yield worker, url


def _stalled_reader(port: int) -> socket.socket:
    """A client that sends a streaming request and then reads nothing."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    client.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    return client


def _connected_to(pid: int, client_port: int) -> bool:
    return any(
        conn.raddr and conn.raddr.port == client_port for conn in psutil.Process(pid).net_connections(kind="tcp")
    )


def test_a_reader_that_stops_is_dropped_with_its_queue_and_its_worker_request_after_the_send_timeout(
    flooding_worker: tuple[SlowWorker, str],
) -> None:
    worker, worker_url = flooding_worker
    with gateway_process(worker_url, sse_send_timeout_s="1") as gateway:
        url = gateway.url
        client = _stalled_reader(gateway.port)
        client_port = client.getsockname()[1]
        try:
            assert wait_until(worker.started.is_set, timeout_s=20)
            # Held back, then let go: the worker's request is closed (vLLM aborts it) before it could finish...
            assert wait_until(worker.disconnected.is_set, timeout_s=30), "the worker request was never closed"
            assert not worker.completed.is_set()
            # ...and the client's connection is dropped, what was queued for it with it, not left to drain.
            assert wait_until(lambda: not _connected_to(gateway.process.pid, client_port), timeout_s=10)
            in_flight = httpx.get(url + "/metrics", timeout=5).text
            assert f'specgate_in_flight{{model="{MODEL}"}} 0.0' in in_flight
        finally:
            client.close()
        # The gateway serves on.
        assert gateway.ready()
