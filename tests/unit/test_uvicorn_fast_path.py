"""Events written from the worker connection's read callback (streaming/uvicorn_fast_path.py), under real uvicorn."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from gateway.streaming.uvicorn_fast_path import DirectBodyWriter
from tests.unit.fakes import DONE, MODEL, SlowWorker, chat_chunk, gateway_over, vllm_stream

STREAM = {
    "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
    # Usage on every event, as the worker sends it: the client's bytes are then the worker's, unchanged.
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
}


class WriterSpy:
    """Records what the direct writer wrote."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.written: list[bytes] = []
        write = DirectBodyWriter.write

        def spy_write(writer: DirectBodyWriter, body: bytes) -> None:
            self.written.append(body)
            write(writer, body)

        monkeypatch.setattr(DirectBodyWriter, "write", spy_write)


def _output_tokens(metrics: str) -> float:
    lines = [line for line in metrics.splitlines() if line.startswith("specgate_output_tokens_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_events_arriving_apart_are_written_from_the_read_callback_one_to_one_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = WriterSpy(monkeypatch)
    events = vllm_stream([1] * 20 + [2] * 5)
    with gateway_over(SlowWorker(events, gap_s=0.005)) as (url, _):
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
        metrics = httpx.get(url + "/metrics").text
    assert reply.status_code == 200
    assert reply.content == b"".join(events), "every event, in order, unchanged"
    # The first events open the response and [DONE] ends it from the task; the 25 content events in between
    # (and the usage event) arrive one by one and go out from the callback, but for any that share a read with
    # the first events or [DONE] (the three servers here share one process, so reads sometimes merge).
    assert b"".join(spy.written).count(b"data: ") >= 20, len(spy.written)
    assert b"".join(spy.written) in reply.content
    assert DONE not in b"".join(spy.written)
    assert _output_tokens(metrics) == 30, "tokens of events written from the callback are counted too"


def test_bytes_relayed_from_the_read_callback_keep_a_stream_inside_its_idle_bound() -> None:
    # 0.15 s between events, 0.4 s idle bound, ~1.2 s in all: the stream's task waits the whole time while the
    # callback relays; each relayed read must count as the worker's activity.
    worker = SlowWorker(vllm_stream([1] * 8), gap_s=0.15)
    with gateway_over(worker, stream_idle_timeout_s=0.4) as (url, _):
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    assert reply.status_code == 200
    assert reply.content.endswith(DONE) and b"upstream_timeout" not in reply.content


def _read_slowly(port: int, body: bytes, stall_s: float) -> bytes:
    """A client with a small receive buffer that reads the first 64 KiB, stops reading for `stall_s`, then
    reads the rest: the gateway's writes back up meanwhile, so its transport pauses and resumes. Returns the
    HTTP answer, head and body."""
    received = bytearray()
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(body), body))
        client.settimeout(20)
        stalled = False
        while not received.endswith(b"0\r\n\r\n"):
            piece = client.recv(65536)
            if not piece:
                break
            received += piece
            if not stalled and len(received) > 65536:
                stalled = True
                time.sleep(stall_s)
    return bytes(received)


def _dechunked(answer: bytes) -> bytes:
    end_of_head = answer.index(b"\r\n\r\n") + 4
    assert b"transfer-encoding: chunked" in answer[:end_of_head].lower(), answer[:end_of_head]
    body, at = bytearray(), end_of_head
    while True:
        end_of_size = answer.index(b"\r\n", at)
        size = int(answer[at:end_of_size], 16)
        if size == 0:
            return bytes(body)
        body += answer[end_of_size + 2:end_of_size + 2 + size]
        at = end_of_size + 2 + size + 2


def test_a_client_that_reads_slowly_gets_every_byte_in_order_across_direct_and_task_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = WriterSpy(monkeypatch)
    events = [chat_chunk("x" * 4000 + str(index), index) for index in range(1, 1501)] + [DONE]  # ~6 MB
    with gateway_over(SlowWorker(events, gap_s=0)) as (url, _):
        answer = _read_slowly(int(url.rsplit(":", 1)[1]), json.dumps(STREAM).encode(), stall_s=1.5)
    assert _dechunked(answer) == b"".join(events)
    # Large events split across reads, and the stall pauses the client's transport: the task writes some of
    # them, the callback others.
    assert spy.written, "some events went out from the callback"


class FlushSpy:
    """Records each joined write (streaming/uvicorn_fast_path.py, `writes_joined`) as it goes to the transport."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from gateway.streaming import uvicorn_fast_path as directwrite

        self.flushed: list[bytes] = []
        flush = directwrite._HeldWrites.flush

        def spy_flush(held: Any) -> None:
            if held.parts:
                self.flushed.append(b"".join(held.parts))
            flush(held)

        monkeypatch.setattr(directwrite._HeldWrites, "flush", spy_flush)


def test_the_head_and_the_events_the_stream_opened_on_leave_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = FlushSpy(monkeypatch)
    events = vllm_stream([1] * 4)
    with gateway_over(SlowWorker(events, gap_s=0.02)) as (url, _):
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    assert reply.status_code == 200 and reply.content == b"".join(events)
    [joined] = spy.flushed
    head, _, body = joined.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"x-request-id" in head.lower()
    assert body == b"%x\r\n%b\r\n" % (len(events[0]), events[0]), "the first event, framed, in the same write"


def test_a_stream_whole_in_its_first_read_reaches_a_client_that_asked_to_close() -> None:
    # Everything up to [DONE] in the worker's first read: the head, the events and the body's end are one
    # write, and the server closes the connection inside it (`connection: close`): nothing may be lost.
    events = vllm_stream([1, 2])
    body = json.dumps(STREAM).encode()
    with gateway_over(SlowWorker([b"".join(events)], gap_s=0)) as (url, _):
        received = bytearray()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n"
                           b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            client.settimeout(10)
            while piece := client.recv(65536):
                received += piece
    assert received.startswith(b"HTTP/1.1 200")
    assert _dechunked(bytes(received)) == b"".join(events)


class OpenSpy:
    """Records each response opened from outside its task (streaming/uvicorn_fast_path.py, `ResponseOpener.open`), and
    whether a worker connection's read callback was running it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import sys

        from gateway.streaming import uvicorn_fast_path as directwrite

        self.from_read_callback: list[bool] = []
        open_response = directwrite.ResponseOpener.open

        def spy_open(opener: Any, body: bytes) -> DirectBodyWriter:
            frame, callers = sys._getframe(1), []
            while frame is not None:
                callers.append((frame.f_code.co_name, frame.f_code.co_filename))
                frame = frame.f_back  # type: ignore[assignment]
            self.from_read_callback.append(
                any(name == "data_received" and path.endswith("http1/connection.py") for name, path in callers)
            )
            return open_response(opener, body)

        monkeypatch.setattr(directwrite.ResponseOpener, "open", spy_open)


def test_a_streams_head_and_first_events_go_out_from_the_workers_read_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under load the request's task is woken a loop turn after the first event arrives, and that turn was most
    # of what the gateway added to the time to first token: the callback that reads the event now writes it.
    opened, flushed = OpenSpy(monkeypatch), FlushSpy(monkeypatch)
    events = vllm_stream([1] * 4)
    # The head at once and the first event later, as vLLM answers (its prefill comes between them).
    with gateway_over(SlowWorker(events, gap_s=0.02, prefill_s=0.1)) as (url, _):
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
        metrics = httpx.get(url + "/metrics").text
    assert reply.status_code == 200 and reply.content == b"".join(events)
    assert reply.headers["x-request-id"], "the head went through the app's middleware"
    assert opened.from_read_callback == [True]
    [joined] = flushed.flushed
    head, _, body = joined.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"%x\r\n%b\r\n" % (len(events[0]), events[0]), "the head and the first event, one write"
    assert _output_tokens(metrics) == 4
    ttft = [line for line in metrics.splitlines() if line.startswith("specgate_time_to_first_token_seconds_count{")]
    assert [float(line.rsplit(" ", 1)[1]) for line in ttft] == [1.0], "the first token is timed where it is written"


def test_a_first_read_the_callback_cannot_take_opens_the_stream_from_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    # A first read that ends inside an event, or an error event first: the task takes them, as before.
    opened = OpenSpy(monkeypatch)
    events = vllm_stream([1] * 3)
    split = SlowWorker([events[0] + events[1][:25], events[1][25:], *events[2:]], gap_s=0.02, prefill_s=0.1)
    with gateway_over(split) as (url, _):
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    assert reply.status_code == 200 and reply.content == b"".join(events)
    error = b'data: {"error": {"message": "boom", "type": "internal_error", "code": 500}}\n\n'
    with gateway_over(SlowWorker([error, *events], gap_s=0.02, prefill_s=0.1)) as (url, _):
        failed = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    assert failed.status_code == 200 and failed.content.startswith(error) and DONE not in failed.content
    assert opened.from_read_callback == []
