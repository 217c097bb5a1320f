"""Faults over real HTTP: a worker hanging up, a reader that takes no bytes, connections handed back to the pool."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from gateway.app import create_app
from tests.unit.fakes import (
    DONE,
    MODEL,
    STREAM,
    SlowWorker,
    chat_chunk,
    data_events,
    gateway_over,
    serve_in_thread,
    settings_for,
    vllm_stream,
)


def test_finished_streams_hand_their_connection_back_to_the_pool() -> None:
    worker = SlowWorker(vllm_stream([1, 1, 1]), gap_s=0)
    with gateway_over(worker) as (url, _):
        for _ in range(3):
            reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
            assert data_events(reply.text)[-1] == "data: [DONE]"
    assert len(worker.clients) == 3
    assert len(set(worker.clients)) == 1, f"one kept-alive connection expected, saw {set(worker.clients)}"


@contextlib.contextmanager
def hanging_up_worker() -> Iterator[str]:
    """A raw-socket worker that answers GETs like vLLM but closes the connection on every POST, before any
    response byte: what a worker that crashes mid-request looks like from the gateway."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                request = conn.recv(65536)
                if request.startswith(b"GET"):
                    body = b'{"object": "list", "data": [{"id": "%s"}]}' % MODEL.encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_a_worker_hanging_up_is_reported_as_such() -> None:
    with hanging_up_worker() as worker_url:
        app = create_app(settings_for(worker_url, max_attempts=2))
        with serve_in_thread(app) as url:
            reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    assert reply.status_code == 502, reply.text
    message = reply.json()["error"]["message"]
    assert "could not connect" not in message, message
    assert "closed" in message.lower() or "disconnect" in message.lower(), message


@pytest.mark.parametrize(("size", "count"), [
    (8000, 3000),  # events often split across the gateway's reads: those go through the stream's task
    (1000, 24000),  # whole events per read: relayed from the read callback until the client stops taking bytes
])
def test_a_reader_that_takes_no_bytes_is_cut_after_the_send_timeout_and_the_worker_released(
    size: int, count: int,
) -> None:
    big_events = [chat_chunk("x" * size, index) for index in range(1, count + 1)] + [DONE]  # ~24 MB: fills any buffer
    worker = SlowWorker(big_events, gap_s=0)
    with gateway_over(worker, sse_send_timeout_s=0.5) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(STREAM).encode()
        with socket.socket() as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", port))
            reader.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                           b"content-length: %d\r\n\r\n%s" % (len(body), body))
            assert worker.started.wait(10), "the request never reached the worker"
            # The reader never reads: the gateway must give up on it and close the worker request.
            assert worker.disconnected.wait(20), "a stalled reader held the worker request open"
            assert not worker.completed.is_set()
