"""Worker faults before and after the first byte, deadlines, pings and graceful shutdown (real HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.admission.deadlines import FirstTokenBudget
from gateway.app import create_app
from tests.unit.fakes import (
    CHAT,
    DONE,
    MODEL,
    STREAM,
    SlowWorker,
    chat_chunk,
    gateway_over,
    serve_in_thread,
    settings_for,
    vllm_stream,
    wait_until,
)


def _events(body: str) -> list[str]:
    return [event for event in body.split("\n\n") if event.startswith("data:")]


def test_a_worker_with_no_first_token_in_time_is_abandoned_for_another() -> None:
    hung = SlowWorker(vllm_stream([1]), gap_s=0, first_delay_s=30)
    healthy = SlowWorker(vllm_stream([1, 1]), gap_s=0)
    with gateway_over(hung, healthy, first_token_timeout_s=0.3, routing="round_robin") as (url, _):
        answers = [httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert all(_events(a.text)[-1] == "data: [DONE]" for a in answers)
    assert hung.started.is_set() and wait_until(hung.disconnected.is_set, 2), "the hung request was closed"


def test_the_first_token_wait_scales_with_the_prompt_and_the_workers_queue_up_to_its_cap() -> None:
    budget = FirstTokenBudget(base_s=10, per_prompt_kib_s=0.5, per_waiting_s=2, cap_s=120)
    assert budget.limit_s(0, 0) == 10
    assert budget.limit_s(8 * 1024, 0) == 14
    assert budget.limit_s(0, 5) == 20
    assert budget.limit_s(1024 * 1024, 0) == 120
    assert budget.limit_s(0, -1) == 10  # a gauge read while it was reset


def test_a_long_prompt_waits_longer_for_its_first_token_than_a_short_one() -> None:
    hung = SlowWorker(vllm_stream([1]), gap_s=0, first_delay_s=60)
    healthy = SlowWorker(vllm_stream([1, 1]), gap_s=0)
    long_prompt = {**STREAM, "messages": [{"role": "user", "content": "x" * 4096}]}
    with gateway_over(hung, healthy, first_token_base_s=0.2, first_token_per_prompt_kib_s=0.5,
                      first_token_timeout_s=30, routing="round_robin") as (url, _):
        took = {}
        for name, body in (("short", STREAM), ("long", long_prompt)):
            started = time.monotonic()
            answers = [httpx.post(url + "/v1/chat/completions", json=body, timeout=30) for _ in range(2)]
            took[name] = time.monotonic() - started
            assert [a.status_code for a in answers] == [200, 200]
    # The long one's 4 KiB bought it 2 s more on the hung worker before it was tried on the other.
    assert took["long"] >= 2.0, took
    assert took["long"] > took["short"] + 1.0, took


def test_a_whole_call_ends_at_the_request_timeout_with_retries_counted_in_it() -> None:
    # Each worker dribbles its answer: every wait is far inside the limit, the whole answer takes 1.2 s.
    dribbling = [SlowWorker([b"{" + b" " * 16] * 6 + [b"}"], gap_s=0.2) for _ in range(2)]
    with gateway_over(*dribbling, request_timeout_s=0.5, routing="round_robin") as (url, _):
        started = time.monotonic()
        reply = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=10)
        took = time.monotonic() - started
    assert reply.status_code == 504 and reply.json()["error"]["type"] == "upstream_timeout"
    # Cut at 0.5 s, not once per worker: the second worker was never asked.
    assert took < 0.9, took
    assert sum(worker.started.is_set() for worker in dribbling) == 1
    assert wait_until(lambda: any(worker.disconnected.is_set() for worker in dribbling), 2)


def test_a_stalled_stream_ends_with_an_idle_timeout_error_event() -> None:
    stalled = SlowWorker(vllm_stream([1] * 5), gap_s=30)
    with gateway_over(stalled, stream_idle_timeout_s=0.3) as (url, _):
        started = time.monotonic()
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
        took = time.monotonic() - started
    events = _events(reply.text)
    assert reply.status_code == 200
    assert json.loads(events[-1][6:])["error"]["type"] == "upstream_timeout"
    assert "finish_reason\": \"stop" not in reply.text
    assert took < 5
    assert wait_until(stalled.disconnected.is_set, 2)


def test_a_quiet_stream_gets_keepalive_pings_between_its_events() -> None:
    slow = SlowWorker(vllm_stream([1] * 3), gap_s=0.5)
    with gateway_over(slow, sse_ping_interval_s=0.1) as (url, _):
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    comments = [event for event in reply.text.split("\n\n") if event.startswith(":")]
    assert reply.status_code == 200
    assert len(comments) >= 3 and all(comment.startswith(": ping") for comment in comments), comments
    assert _events(reply.text)[-1] == "data: [DONE]"
    assert len(_events(reply.text)) == 5  # role, three tokens, [DONE]; the usage chunk was not asked for


def test_the_first_ping_comes_one_interval_into_the_stream_and_short_streams_get_none() -> None:
    # Events 0.6 s apart, pings every 0.4 s: the first ping lands between the first two events (at 0.4 s, not
    # at 0.8 s, after the second event, as it would were the interval waited twice).
    slow = SlowWorker(vllm_stream([1] * 2), gap_s=0.6)
    quick = SlowWorker(vllm_stream([1] * 2), gap_s=0.01)
    with gateway_over(slow, sse_ping_interval_s=0.4) as (url, _):
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    with gateway_over(quick, sse_ping_interval_s=0.4) as (url, _):
        short = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    events = [event for event in reply.text.split("\n\n") if event]
    assert events[0].startswith("data:") and events[1].startswith(": ping"), events
    assert events[-1] == "data: [DONE]"
    assert short.status_code == 200 and ": ping" not in short.text and short.text.endswith("data: [DONE]\n\n")


def test_graceful_shutdown_refuses_new_work_and_ends_long_streams_after_the_grace() -> None:
    long_stream = SlowWorker(vllm_stream([1] * 400), gap_s=0.02)
    with (
        gateway_over(long_stream, shutdown_grace_s=0.5) as (url, app),
        httpx.Client(base_url=url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=STREAM) as open_stream,
    ):
        lines = open_stream.iter_lines()
        next(lines)
        app.state.drainer.begin()
        assert wait_until(lambda: client.get("/ready").status_code == 503, 2)
        refused = client.post("/v1/chat/completions", json=STREAM)
        rest = [line for line in lines if line.startswith("data:")]
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "shutting_down"
    assert json.loads(rest[-1][6:])["error"]["code"] == "shutting_down"
    assert len(rest) < 400
    assert wait_until(long_stream.disconnected.is_set, 2)


def test_a_stream_that_finishes_within_the_grace_is_not_cut() -> None:
    short = SlowWorker(vllm_stream([1] * 10), gap_s=0.02)
    with (
        gateway_over(short, shutdown_grace_s=5) as (url, app),
        httpx.Client(base_url=url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=STREAM) as open_stream,
    ):
        lines = open_stream.iter_lines()
        next(lines)
        app.state.drainer.begin()
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"


def test_a_whole_call_still_running_at_the_drain_deadline_is_a_503_and_its_worker_is_let_go() -> None:
    slow = SlowWorker([b'{"choices": []}'], gap_s=0.0, first_delay_s=30)
    with gateway_over(slow, shutdown_grace_s=0.5) as (url, app), httpx.Client(base_url=url, timeout=10) as client:
        threading.Timer(0.2, app.state.drainer.begin).start()
        started = time.monotonic()
        reply = client.post("/v1/chat/completions", json=CHAT)
        took = time.monotonic() - started
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "shutting_down"
    assert reply.headers["retry-after"]
    assert took < 1.5, took
    assert wait_until(slow.disconnected.is_set, 2)


def test_a_stream_that_opens_during_the_drain_ends_at_the_same_deadline() -> None:
    # Its first token comes 1 s after the drain began; a grace counted from then would end it at 2 s.
    late = SlowWorker(vllm_stream([1] * 400), gap_s=0.02, first_delay_s=1.0)
    with gateway_over(late, shutdown_grace_s=1.0) as (url, app), httpx.Client(base_url=url, timeout=10) as client:
        threading.Timer(0.05, app.state.drainer.begin).start()
        started = time.monotonic()
        reply = client.post("/v1/chat/completions", json=STREAM)
        took = time.monotonic() - started
    events = _events(reply.text)
    assert json.loads(events[-1][6:])["error"]["code"] == "shutting_down"
    assert took < 1.6, took


def test_finished_streams_hand_their_connection_back_to_the_pool() -> None:
    worker = SlowWorker(vllm_stream([1, 1, 1]), gap_s=0)
    with gateway_over(worker) as (url, _):
        for _ in range(3):
            reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
            assert _events(reply.text)[-1] == "data: [DONE]"
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



class FirstReadClient:
    """A worker client whose answer's first read reaches the gateway's opening sink `arrives_s` after the request,
    and whose reader comes back `reader_back_s` after that: the two moments the first-token deadline can fall
    between."""

    def __init__(self, arrives_s: float, reader_back_s: float = 0.0) -> None:
        self.arrives_s = arrives_s
        self.reader_back_s = reader_back_s
        self.taken: list[bool] = []
        self.closed = False

    async def post(self, worker_url: str, path: str, body: bytes, request_id: str, streaming: bool) -> Any:
        from gateway.upstream.client import Sink, WorkerReply

        async def read() -> bytes:
            return b""

        async def read_first_inline(sink: Sink) -> bytes | None:
            loop = asyncio.get_running_loop()
            taken: asyncio.Future[None] = loop.create_future()

            def arrive() -> None:
                self.taken.append(sink(chat_chunk("a", 1)))
                if not taken.done():  # cancelled, with its task, by a deadline that passed first
                    taken.set_result(None)

            loop.call_later(self.arrives_s, arrive)
            await taken
            await asyncio.sleep(self.reader_back_s)
            return None

        async def close() -> None:
            self.closed = True

        return WorkerReply(200, {}, read, close, None, read_first_inline)


def _recorded(sent: list[bytes]) -> Any:
    def opening(data: bytes) -> bool:
        sent.append(data)
        return True

    return opening


@pytest.mark.anyio
async def test_a_first_read_after_the_first_token_deadline_does_not_reach_the_client() -> None:
    from gateway.errors import UpstreamTimeout
    from gateway.upstream.calls import Upstream

    # The deadline's cancel may be on its way to the task when the read arrives: sent to the client then, the
    # stream would be retried on another worker with the first worker's bytes already out.
    late = FirstReadClient(arrives_s=0.3)
    sent: list[bytes] = []
    upstream = Upstream(late, settings_for("http://w", first_token_timeout_s=0.2), time.perf_counter)
    with pytest.raises(UpstreamTimeout):
        await upstream.open_stream("http://w", "/v1/chat/completions", b"{}", "r1", _recorded(sent))
    await asyncio.sleep(0.2)
    assert late.taken == [False] and sent == [] and late.closed


@pytest.mark.anyio
async def test_a_first_read_sent_to_the_client_ends_the_first_token_deadline() -> None:
    from gateway.upstream.calls import Upstream

    # Taken at 0.1 s of a 0.2 s deadline, the reader back at 0.4 s: from the first bytes out, no retry elsewhere.
    quick = FirstReadClient(arrives_s=0.1, reader_back_s=0.3)
    sent: list[bytes] = []
    upstream = Upstream(quick, settings_for("http://w", first_token_timeout_s=0.2), time.perf_counter)
    opened = await upstream.open_stream("http://w", "/v1/chat/completions", b"{}", "r1", _recorded(sent))
    assert quick.taken == [True] and sent == [chat_chunk("a", 1)]
    assert opened.first_events == [] and not quick.closed
    await opened.aclose()
