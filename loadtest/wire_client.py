"""Load generator transport: streaming POSTs over keep-alive HTTP/1.1 connections, each body read timed where it
lands (the connection's read callback), on gateway/upstream/http1/connection.py's httptools protocol.

Why not aiohttp, as `vllm bench serve` uses: per SSE event aiohttp's client runs its parser's callbacks, its
StreamReader's buffer and waiter, and a wake-up of the request's task; at 300 streams of 10 ms gaps that cost
~35 µs of the load generator's core per event, which with the fake engine beside it filled that core, so the
benchmark measured its own core rather than the target (docs/design/performance.md). Here each network
read goes from the protocol's `data_received` straight to the request's parser (`Sink`): no task wakes per
event, and the timestamp is taken as the bytes are handed over rather than a loop turn later.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from gateway.upstream.client import Sink
from gateway.upstream.http1.client import HttpUrl, connect, take_idle
from gateway.upstream.http1.connection import WorkerConnection
from gateway.upstream.http1.errors import WorkerHungUp

CONNECT_TIMEOUT_S = 10.0
_SET_HERE = frozenset(("host", "content-type", "content-length", "accept-encoding", "transfer-encoding"))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One URL's origin and its request head up to the headers that change per request."""

    host: str
    port: int
    head: bytes
    tls: bool = False

    @classmethod
    def of(cls, url: str, headers: tuple[tuple[str, str], ...]) -> Endpoint:
        parts = HttpUrl.parse(url)
        if parts is None:
            raise ValueError(f"not an http(s) URL: {url}")
        lines = [f"POST {parts.target} HTTP/1.1", f"host: {parts.netloc}", "content-type: application/json",
                 "accept: text/event-stream", "accept-encoding: identity",
                 *(f"{name}: {value}" for name, value in headers if name.lower() not in _SET_HERE)]
        return cls(parts.host, parts.port, ("\r\n".join(lines) + "\r\n").encode("latin-1"), parts.scheme == "https")


@dataclass(slots=True)
class Answer:
    """What came back: the status, and the body when it was not a 200 (a 200's body went to the sink)."""

    status: int
    body: bytes = b""


class StreamClient:
    """Keep-alive connections to one endpoint, any number at once (the run's scheduler bounds concurrency).
    A request that does not finish closes its connection, so only idle ones are left to close at the end."""

    def __init__(self, url: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._endpoint = Endpoint.of(url, headers)
        # Built once: loading the CA store per connection would read it from disk every time.
        self._tls = ssl.create_default_context() if self._endpoint.tls else None
        self._idle: list[WorkerConnection] = []

    async def post(self, body: bytes, sink: Sink, extra_headers: bytes = b"") -> Answer:
        """Send one POST; a 200's body is handed to `sink` read by read, from the connection's read callback
        (what arrived with the head, from the request's task). `sink` takes every read (returns True).
        `extra_headers` are whole header lines (`name: value\\r\\n`). A reused connection that the server had
        closed before any answer is replaced once, as clients do for a request the server never saw."""
        request = b"%s%scontent-length: %d\r\n\r\n%s" % (self._endpoint.head, extra_headers, len(body), body)
        connection = take_idle(self._idle)
        reused = connection is not None
        try:
            if connection is None:
                connection = await self._connect()
            try:
                await connection.exchange(request, None)
            except WorkerHungUp:
                if not reused:
                    raise
                connection.close()
                connection = await self._connect()
                await connection.exchange(request, None)
            answer = Answer(connection.status)
            if answer.status == 200:
                while data := await connection.read_inline(sink):
                    sink(data)
            else:
                answer.body = await _read_whole(connection)
        except BaseException:
            if connection is not None:
                connection.close()  # unfinished: the server sees the request go away, as it would with aiohttp
            raise
        if connection.reusable:
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
        else:
            connection.close()
        return answer

    async def aclose(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    async def _connect(self) -> WorkerConnection:
        return await connect(self._endpoint.host, self._endpoint.port, self._tls, CONNECT_TIMEOUT_S)


async def _read_whole(connection: WorkerConnection) -> bytes:
    chunks = []
    while chunk := await connection.read():
        chunks.append(chunk)
    return b"".join(chunks)
