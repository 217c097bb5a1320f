"""Reads handed to a sink from the worker connection's read callback (gateway/upstream/http1/connection.py, inline
reads), on real sockets."""

from __future__ import annotations

import asyncio

import pytest

from gateway.upstream.http1.errors import WorkerBadResponse
from tests.unit.wirefakes import STREAM_HEAD, chunk, client, read_body, read_request, serving

pytestmark = pytest.mark.anyio


async def test_an_inline_read_hands_arriving_bytes_to_its_sink_until_the_sink_refuses() -> None:
    events = [b"data: %d\n\n" % index for index in range(5)]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(events[0]))
        for event in events[1:]:
            await asyncio.sleep(0.05)  # one network read per event
            writer.write(chunk(event))
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    taken: list[bytes] = []

    def sink(body: bytes) -> bool:
        if b"3" in body:
            return False
        taken.append(body)
        return True

    async with serving(handle) as worker, client() as wire:
        reply = await wire.post(worker.url, "/v1/completions", b"{}", "req-1", True)
        assert reply.read_inline is not None
        # Bytes already received are the read's, not the sink's.
        assert await reply.read_inline(sink) == events[0]
        assert await reply.read_inline(sink) == events[3], "the first refused bytes end the read"
        assert taken == events[1:3]
        await asyncio.sleep(0.1)  # the last event arrives while nobody reads: it waits for the next read
        assert await reply.read() == events[4]
        assert await reply.read() == b""
        assert taken == events[1:3]
        await reply.aclose()


async def test_a_sink_that_fails_ends_the_answer_as_a_bad_one_and_the_connection_is_not_reused() -> None:
    events = [b"data: %d\n\n" % index for index in range(3)]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(STREAM_HEAD + chunk(events[0]))
            for event in events[1:]:
                await asyncio.sleep(0.05)
                writer.write(chunk(event))
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    def sink(body: bytes) -> bool:
        raise ValueError("cannot take this")

    async with serving(handle) as worker, client() as wire:
        reply = await wire.post(worker.url, "/v1/completions", b"{}", "req-1", True)
        assert reply.read_inline is not None
        assert await reply.read_inline(sink) == events[0]
        with pytest.raises(WorkerBadResponse, match="could not be relayed"):
            await reply.read_inline(sink)
        await reply.aclose()
        again = await wire.post(worker.url, "/v1/completions", b"{}", "req-2", True)
        assert await read_body(again.read) == b"".join(events)
        await again.aclose()
    assert worker.connections == 2, "the failed connection was closed, a new one made"


async def test_a_first_inline_read_lets_its_reader_go_once_the_sink_takes_a_read() -> None:
    events = [b"data: %d\n\n" % index for index in range(4)]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(STREAM_HEAD)  # the head at once, the events later: vLLM's prefill between them
            for event in events:
                await asyncio.sleep(0.05)
                writer.write(chunk(event))
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    taken: list[bytes] = []

    def sink(body: bytes) -> bool:
        taken.append(body)
        return True

    async with serving(handle) as worker, client() as wire:
        reply = await wire.post(worker.url, "/v1/completions", b"{}", "req-1", True)
        assert reply.read_first_inline is not None
        assert await reply.read_first_inline(sink) is None
        assert taken == [events[0]], "released at the first read taken, not kept on for the next"
        assert await read_body(reply.read) == b"".join(events[1:]) and taken == [events[0]]
        await reply.aclose()
        refused = await wire.post(worker.url, "/v1/completions", b"{}", "req-2", True)
        assert refused.read_first_inline is not None
        assert await refused.read_first_inline(lambda body: False) == events[0], "refused bytes are the read's"
        assert await read_body(refused.read) == b"".join(events[1:])
        await refused.aclose()
