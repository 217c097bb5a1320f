"""Relay fidelity and usage handling, through the whole app with a scripted worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.upstream.client import WorkerClient
from tests.unit.fakes import (
    DONE,
    MODEL,
    ScriptedWorker,
    gateway_client,
    mock_client,
    reply_of,
    settings_for,
    vllm_stream,
)

pytestmark = pytest.mark.anyio


def _events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event]


def _payloads(body: bytes) -> list[dict[str, object]]:
    return [json.loads(e[6:]) for e in _events(body) if e.startswith(b"data: {")]


def _streaming_worker(events: list[bytes]) -> ScriptedWorker:
    worker = ScriptedWorker()
    worker.on_post = lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=b"".join(events)
    )
    return worker


async def _stream(stream_options: dict[str, bool] | None, events: list[bytes]) -> tuple[bytes, ScriptedWorker]:
    worker = _streaming_worker(events)
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if stream_options is not None:
        body["stream_options"] = stream_options
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.content, worker


async def test_every_upstream_event_reaches_the_client_unchanged() -> None:
    upstream = vllm_stream([1, 1, 1, 1, 1])
    body, _ = await _stream({"include_usage": True, "continuous_usage_stats": True}, upstream)
    assert _events(body) == [event.rstrip(b"\n") for event in upstream]


async def test_events_split_across_network_chunks_are_reassembled_one_to_one() -> None:
    upstream = vllm_stream([1, 2, 3])
    joined = b"".join(upstream)
    pieces = [joined[i : i + 7] for i in range(0, len(joined), 7)]
    async def in_pieces() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    worker = ScriptedWorker()
    worker.on_post = lambda request: httpx.Response(200, content=in_pieces())
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
               "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
        response = await client.post("/v1/chat/completions", json=request)
    assert _events(response.content) == [event.rstrip(b"\n") for event in upstream]


async def test_worker_is_asked_for_continuous_usage_even_when_client_did_not_ask() -> None:
    _, worker = await _stream(None, vllm_stream([1]))
    sent = json.loads(worker.seen[0].content)
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


async def test_client_without_include_usage_sees_no_usage_at_all() -> None:
    body, _ = await _stream(None, vllm_stream([1, 1, 1]))
    payloads = _payloads(body)
    assert all("usage" not in payload for payload in payloads)
    assert all(payload["choices"] for payload in payloads), "the usage-only chunk must be held back"
    assert len(payloads) == 4  # role chunk + three content chunks
    assert _events(body)[-1] == DONE.rstrip(b"\n")


async def test_include_usage_alone_gives_only_the_final_usage_chunk() -> None:
    body, _ = await _stream({"include_usage": True}, vllm_stream([1, 1, 1]))
    payloads = _payloads(body)
    with_usage = [payload for payload in payloads if "usage" in payload]
    assert len(with_usage) == 1
    assert with_usage[0]["choices"] == []
    assert with_usage[0]["usage"]["completion_tokens"] == 3  # type: ignore[index]


async def test_continuous_usage_passes_usage_on_every_chunk() -> None:
    body, _ = await _stream({"include_usage": True, "continuous_usage_stats": True}, vllm_stream([2, 2]))
    assert all("usage" in payload for payload in _payloads(body))


async def test_non_streaming_answer_is_forwarded_byte_for_byte() -> None:
    answer = {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "x", "index": 0}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    raw = json.dumps(answer, separators=(",", ":")).encode()
    worker = ScriptedWorker()
    worker.on_post = lambda request: httpx.Response(200, content=raw, headers={"content-type": "application/json"})
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
        response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1})
    assert response.status_code == 200
    assert response.content == raw
    assert json.loads(worker.seen[0].content) == {"model": MODEL, "prompt": "a", "max_tokens": 1}


async def test_client_request_id_is_echoed_and_forwarded() -> None:
    worker = _streaming_worker(vllm_stream([1]))
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
        mine = await client.post("/v1/chat/completions", json=request, headers={"x-request-id": "abc-123"})
        generated = await client.post("/v1/chat/completions", json=request)
        not_ascii = await client.post("/v1/chat/completions", json=request, headers={"x-request-id": b"caf\xe9"})
        models = await client.get("/v1/models")
    assert mine.headers["x-request-id"] == "abc-123"
    assert worker.seen[0].headers["x-request-id"] == "abc-123"
    assert len(generated.headers["x-request-id"]) == 32
    # Replaced, not echoed changed: the worker and the client see the same id.
    assert not_ascii.status_code == 200 and len(not_ascii.headers["x-request-id"]) == 32
    assert worker.seen[-1].headers["x-request-id"] == not_ascii.headers["x-request-id"]
    assert models.headers["x-request-id"]


async def test_worker_calls_say_whether_they_stream_and_carry_the_request_id() -> None:
    worker = _streaming_worker(vllm_stream([1]))
    workers = mock_client(worker)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with gateway_client(settings_for(worker.url), workers) as (client, _):
        streamed_answer = await client.post("/v1/chat/completions", json=chat)
        worker.on_post = lambda request: httpx.Response(200, json={"choices": []})
        completed_answer = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
    streamed, completed = [call for call in workers.calls if call.method == "POST"]
    assert (streamed.path, streamed.streaming) == ("/v1/chat/completions", True)
    assert (completed.path, completed.streaming) == ("/v1/completions", False)
    # A stream's reads are bounded by its own guard (the idle timeout); a whole call by the request timeout.
    assert streamed.request_id == streamed_answer.headers["x-request-id"]
    assert completed.request_id == completed_answer.headers["x-request-id"]
    assert json.loads(streamed.body)["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


async def test_events_of_one_upstream_read_leave_in_one_write_and_each_is_counted() -> None:
    from gateway.observability.record import RequestRecord
    from gateway.streaming.stream import Stream
    from gateway.streaming.usage import UsageFilter
    from gateway.upstream.calls import OpenStream
    from gateway.upstream.client import reader_of
    from gateway.upstream.sse import Event, EventSplitter

    role, first, second, third, usage, done = vllm_stream([1, 2, 1])
    reads = [second + third, usage + done]

    async def chunks() -> AsyncIterator[bytes]:
        for read in reads:
            yield read

    splitter = EventSplitter()
    read = reader_of(chunks())
    opened = OpenStream(reply_of(read), splitter,
                        [Event.parse(raw) for raw in splitter.feed(role + first)], sent_at=0.0, first_event_at=0.1)
    record = RequestRecord(request_id="r", model=MODEL, endpoint="chat", stream=True, received_at=0.0)
    ticks = iter(float(n) for n in range(1, 100))
    finished: list[RequestRecord] = []
    relay = Stream(opened, record, UsageFilter(True, True), lambda: next(ticks), finished.append)
    writes = [out async for out in relay.events()]
    assert writes == [role + first, second + third, usage + done]
    assert finished == [], "a clean end is recorded by settle(), once the client's response is complete"
    await relay.settle()
    assert record.output_tokens == 4 and record.first_chunk_tokens == 1
    assert [tokens for _, tokens in record.chunk_gaps] == [2, 1], "every event counted, not every write"
    assert finished == [record] and record.status == "200"


async def test_finished_requests_leave_no_worker_response_for_the_garbage_collector() -> None:
    # httpx's response and its stream refer to each other; the gateway unlinks them on close, so a request's
    # objects are freed at once instead of piling up for the collector (full collections paused every stream).
    import gc

    worker = _streaming_worker(vllm_stream([1, 1, 1]))
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
        await client.post("/v1/chat/completions", json={**chat, "stream": True})  # warm: lazy imports, caches
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True})
                worker.on_post = lambda request: httpx.Response(200, json={"choices": [], "usage": {}})
                completed = await client.post("/v1/chat/completions", json=chat)
                worker.on_post = _streaming_worker(vllm_stream([1, 1, 1])).on_post
                assert streamed.status_code == completed.status_code == 200
            gc.collect()
            from_workers = [o for o in gc.garbage if isinstance(o, httpx.Response) and o.request.url.host == "worker-a"]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert from_workers == []


async def test_a_stream_is_read_straight_from_the_connection() -> None:
    import time

    from gateway.upstream.calls import Upstream
    from gateway.upstream.http1.client import Http1WorkerClient
    from gateway.upstream.http1.connection import WorkerConnection
    from tests.support import serve_in_thread
    from tests.unit.fakes import SlowWorker

    events = vllm_stream([1, 2])
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()

    async def read_all(url: str, worker_client: WorkerClient) -> tuple[object, bytes]:
        upstream = Upstream(worker_client, settings_for(url), time.perf_counter)
        opened = await upstream.open_stream(url, "/v1/chat/completions", body, "r1")
        received = b"".join(event.raw + b"\n\n" for event in opened.first_events) + opened.splitter.pending
        while chunk := await opened.next_chunk():
            received += chunk
        await opened.aclose()
        return getattr(opened.reply.read, "__self__", None), received

    # One call per chunk, no iterator layers: if this ever reads through a wrapper, it fails rather than slows down.
    with serve_in_thread(SlowWorker(events, gap_s=0.01)) as url:
        client = Http1WorkerClient(settings_for(url))
        try:
            reader, received = await read_all(url, client)
        finally:
            await client.aclose()
        assert isinstance(reader, WorkerConnection)
        assert received == b"".join(events)

    worker = _streaming_worker(events)
    reader, received = await read_all(worker.url, mock_client(worker))
    assert not isinstance(reader, WorkerConnection)
    assert received == b"".join(events)


async def _asgi_messages(events: list[bytes]) -> list[dict[str, Any]]:
    """The app's ASGI messages for one streaming request, called as a server calls it."""
    worker = _streaming_worker(events)
    app = create_app(settings_for(worker.url), worker_client=mock_client(worker))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    requests = [{"type": "http.request", "body": body, "more_body": False}]
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)
    return messages


@pytest.mark.parametrize(("events", "last_event"), [
    (vllm_stream([1, 1, 1]), b"data: [DONE]\n\n"),
    (vllm_stream([1, 1, 1])[:2], b'"code":"upstream_failed"'),  # the worker hung up before [DONE]
])
async def test_the_last_event_and_the_body_end_leave_in_one_write(events: list[bytes], last_event: bytes) -> None:
    messages = await _asgi_messages(events)
    bodies = [message for message in messages if message["type"] == "http.response.body"]
    assert [message["more_body"] for message in bodies] == [True] * (len(bodies) - 1) + [False]
    assert last_event in bodies[-1]["body"] and bodies[-1]["body"].endswith(b"\n\n")
    assert all(message["body"] for message in bodies)
