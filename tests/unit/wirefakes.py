"""Loopback HTTP/1.1 workers written on asyncio streams, for the worker client's tests (upstream/http1/)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from gateway.upstream.http1.client import Http1WorkerClient
from tests.unit.fakes import settings_for

STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    return head, await reader.readexactly(length)


class Worker:
    """A loopback HTTP/1.1 server running `handler` per connection; counts connections and closed ones."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_client = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Worker]:
    worker = Worker(handler)
    server = await asyncio.start_server(worker._serve, "127.0.0.1", 0)
    worker.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield worker
    finally:
        server.close()


def events_handler(events: list[bytes]) -> Handler:
    """Answers every request on the connection with `events` as one chunked SSE body."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(STREAM_HEAD + b"".join(chunk(event) for event in events) + b"0\r\n\r\n")
            await writer.drain()

    return handle


@contextlib.asynccontextmanager
async def client(**overrides: object) -> AsyncIterator[Http1WorkerClient]:
    wire = Http1WorkerClient(settings_for("http://127.0.0.1:1", **overrides))
    try:
        yield wire
    finally:
        await wire.aclose()


async def read_body(read: Callable[[], Awaitable[bytes]]) -> bytes:
    body = b""
    while piece := await read():
        body += piece
    return body
