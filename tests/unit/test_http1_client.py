"""The default worker client (gateway/upstream/http1/) on real sockets: reuse, flow, failures."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.upstream.http1 import client as workerwire
from gateway.upstream.http1.client import build_head
from gateway.upstream.http1.connection import HIGH_WATER
from gateway.upstream.http1.errors import (
    WorkerBadResponse,
    WorkerBodyCut,
    WorkerConnectTimeout,
    WorkerHungUp,
    WorkerReadTimeout,
    WorkerUnreachable,
)
from tests.unit.wirefakes import STREAM_HEAD, chunk, client, events_handler, read_body, read_request, serving

pytestmark = pytest.mark.anyio

async def test_a_body_read_to_its_end_returns_the_connection_for_the_next_request() -> None:
    events = [b"data: {}\n\n", b"data: [DONE]\n\n"]
    async with serving(events_handler(events)) as worker, client() as wire:
        for _ in range(5):
            reply = await wire.post(worker.url, "/v1/chat/completions", b"{}", "req-1", True)
            assert reply.status == 200
            assert reply.headers["Content-Type"] == "text/event-stream"  # looked up case-insensitively
            assert await read_body(reply.read) == b"".join(events)
            await reply.aclose()
    assert worker.connections == 1


async def test_the_pools_gets_share_the_keep_alive_connection_and_are_bounded_in_time() -> None:
    asked: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            asked.append(head.split(b"\r\n", 1)[0])
            if head.startswith(b"GET /slow"):
                await asyncio.sleep(30)
            body = b"vllm:num_requests_waiting 2.0\n"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async with serving(answer) as worker, client() as wire:
        pages = [await wire.get(worker.url, "/metrics", 5) for _ in range(3)]
        assert [(page.status, page.body) for page in pages] == [(200, b"vllm:num_requests_waiting 2.0\n")] * 3
        assert worker.connections == 1, "one keep-alive connection for every scrape"
        with pytest.raises(WorkerReadTimeout):
            await wire.get(worker.url, "/slow", 0.2)
    assert asked == [b"GET /metrics HTTP/1.1"] * 3 + [b"GET /slow HTTP/1.1"]


async def test_the_chunks_of_one_network_read_come_out_in_one_read() -> None:
    events = [b"data: %d\n\n" % index for index in range(10)]
    async with serving(events_handler(events)) as worker, client() as wire:
        reply = await wire.post(worker.url, "/v1/completions", b"{}", "req-1", True)
        first = await reply.read()
        await reply.aclose()
    # The whole answer was written at once: ten HTTP chunks, one read of ten events.
    assert first == b"".join(events)


async def test_an_unfinished_body_closes_the_connection_so_the_worker_sees_the_client_go() -> None:
    left = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD)
        try:
            while True:
                writer.write(chunk(b"data: {}\n\n"))
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            left.set()
            raise

    async with serving(endless) as worker, client() as wire:
        reply = await wire.post(worker.url, "/v1/chat/completions", b"{}", "req-1", True)
        assert await reply.read()
        await reply.aclose()
        await asyncio.wait_for(left.wait(), 5)
        reply = await wire.post(worker.url, "/v1/chat/completions", b"{}", "req-2", True)
        await reply.aclose()
    assert worker.connections == 2


async def test_an_idle_connection_past_the_keepalive_expiry_or_closed_by_the_worker_is_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = [b"data: [DONE]\n\n"]

    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(events[0]) + b"0\r\n\r\n")
        await writer.drain()  # then the connection closes, as vLLM's does after its keep-alive timeout

    async with serving(once_then_close) as worker, client() as wire:
        for _ in range(3):
            reply = await wire.post(worker.url, "/v1/chat/completions", b"{}", "req", True)
            assert await read_body(reply.read) == events[0]
            await reply.aclose()
            await asyncio.sleep(0.05)
        assert worker.connections == 3
        assert not any(wire._idle.values()), "a connection the worker closed stayed in the pool"

    monkeypatch.setattr(workerwire, "KEEPALIVE_EXPIRY_S", 0.05)
    async with serving(events_handler(events)) as worker, client() as wire:
        for _ in range(2):
            reply = await wire.post(worker.url, "/v1/chat/completions", b"{}", "req", True)
            await read_body(reply.read)
            await reply.aclose()
            await asyncio.sleep(0.1)
    assert worker.connections == 2


async def test_an_unread_body_stops_the_socket_being_read_past_the_high_water_mark() -> None:
    piece = b"data: " + b"x" * 16_000 + b"\n\n"
    count = 400  # ~6.4 MB: far past the socket buffers and the high-water mark

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD)
        for _ in range(count):
            writer.write(chunk(piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with serving(big) as worker, client() as wire:
        reply = await wire.post(worker.url, "/v1/chat/completions", b"{}", "req-1", True)
        connection = reply.read.__self__  # type: ignore[attr-defined]
        await asyncio.sleep(0.5)
        held = connection._unread
        assert connection._paused
        assert held <= HIGH_WATER + 256 * 1024, held  # at most one socket read past the mark
        assert len(await read_body(reply.read)) == count * len(piece)
        await reply.aclose()


async def test_a_worker_that_hangs_up_before_answering() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(hang_up) as worker, client() as wire:
        with pytest.raises(WorkerHungUp) as caught:
            await wire.post(worker.url, "/v1/chat/completions", b"{}", "req-1", True)
    assert caught.value.message == "worker closed the connection"


async def test_a_body_cut_midway_is_an_error_not_an_end() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: {}\n\n"))
        await writer.drain()

    async with serving(cut) as worker, client() as wire:
        reply = await wire.post(worker.url, "/v1/chat/completions", b"{}", "req-1", True)
        assert await reply.read() == b"data: {}\n\n"
        with pytest.raises(WorkerBodyCut) as caught:
            await reply.read()
        await reply.aclose()
    assert "mid-body" in caught.value.message


async def test_an_answer_that_is_not_http() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with serving(garbage) as worker, client() as wire:
        with pytest.raises(WorkerBadResponse):
            await wire.post(worker.url, "/v1/chat/completions", b"{}", "req-1", True)


async def test_a_refused_port_and_an_unknown_name_are_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with client() as wire:
        with pytest.raises(WorkerUnreachable) as caught:
            await wire.post(f"http://127.0.0.1:{port}", "/v1/completions", b"{}", "req-1", True)
        assert caught.value.message.startswith("could not connect to worker: ")
        with pytest.raises(WorkerUnreachable):
            await wire.post("http://worker.invalid:8000", "/v1/completions", b"{}", "req-2", True)


async def test_past_the_connection_limit_a_request_waits_the_connect_timeout_then_fails() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD)
        await writer.drain()
        await asyncio.sleep(5)

    async with serving(slow) as worker, client(max_upstream_connections=1, connect_timeout_s=0.2) as wire:
        held = await wire.post(worker.url, "/v1/chat/completions", b"{}", "req-1", True)
        with pytest.raises(WorkerConnectTimeout):
            await wire.post(worker.url, "/v1/chat/completions", b"{}", "req-2", True)
        await held.aclose()
        # The slot came back with the close.
        again = await wire.post(worker.url, "/v1/chat/completions", b"{}", "req-3", True)
        await again.aclose()


async def test_a_whole_call_waits_at_most_the_request_timeout_and_reads_a_sized_body() -> None:
    body = b'{"id":"cmpl-1","choices":[]}'

    async def sized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, request_body = await read_request(reader)
        if request_body == b"slow":
            await asyncio.sleep(5)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        await asyncio.sleep(5)

    async with serving(sized) as worker, client(request_timeout_s=0.2) as wire:
        reply = await wire.post(worker.url, "/v1/completions", b"{}", "req-1", False)
        assert await reply.body() == body
        await reply.aclose()
        with pytest.raises(WorkerReadTimeout) as caught:
            await wire.post(worker.url, "/v1/completions", b"slow", "req-2", False)
    assert "in time" in caught.value.message


async def test_the_request_carries_its_id_length_and_host() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, request_body = await read_request(reader)
        seen.extend([head, request_body])
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async with serving(record) as worker, client() as wire:
        reply = await wire.post(worker.url, "/v1/chat/completions", b'{"a":1}', "abc-123", True)
        assert reply.status == 204
        assert await reply.read() == b""
        await reply.aclose()
    head, request_body = seen
    port = worker.url.rsplit(":", 1)[1]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{port}\r\n".encode() in head
    assert b"x-request-id: abc-123\r\n" in head and b"content-length: 7\r\n" in head
    assert request_body == b'{"a":1}'


def test_worker_addresses_become_origins_and_request_targets() -> None:
    target = build_head("POST", "http://[::1]:8000/base", "/v1/completions")
    assert target.origin == ("http", "::1", 8000)
    assert target.head.startswith(b"POST /base/v1/completions HTTP/1.1\r\nhost: [::1]:8000\r\n")
    assert build_head("POST", "https://gpu-0.internal", "/v1/completions").origin == ("https", "gpu-0.internal", 443)
    post = build_head("POST", "http://w:1", "/v1/completions").head
    assert post.startswith(b"POST /v1/completions HTTP/1.1\r\nhost: w:1\r\n")
    assert b"content-type: application/json\r\n" in post and b"accept-encoding: identity\r\n" in post
    assert post.endswith(b"x-request-id: ")
    assert build_head("GET", "http://w:1", "/health").head.startswith(b"GET /health HTTP/1.1\r\n")
    with pytest.raises(WorkerUnreachable):
        build_head("POST", "unix:///tmp/worker.sock", "/v1/completions")
