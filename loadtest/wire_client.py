"""Load generator transport: streaming POSTs over keep-alive HTTP/1.1 connections, each body read timed where it
lands (the connection's read callback), on gateway/workerconnection.py's httptools protocol.

Why not aiohttp, as `vllm bench serve` uses: per SSE event aiohttp's client runs its parser's callbacks, its
StreamReader's buffer and waiter, and a wake-up of the request's task; at 300 streams of 10 ms gaps that cost
~35 µs of the load generator's core per event, which with the fake engine beside it filled that core, so the
benchmark measured its own core rather than the target (loadtest/results/client-choice.md). Here each network
read goes from the protocol's `data_received` straight to the request's parser (`Sink`): no task wakes per
event, and the timestamp is taken as the bytes are handed over rather than a loop turn later.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.workerconnection import WorkerConnection, WorkerConnectTimeout, WorkerHungUp, WorkerUnreachable

# Servers drop idle keep-alive connections (uvicorn after 5 s); one reused at that moment fails a POST.
IDLE_EXPIRY_S = 4.0
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
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        tls = scheme == "https"
        host, port = parts.hostname, parts.port or (443 if tls else 80)
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port is not None else "")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"POST {target} HTTP/1.1", f"host: {netloc}", "content-type: application/json",
                 "accept: text/event-stream", "accept-encoding: identity",
                 *(f"{name}: {value}" for name, value in headers if name.lower() not in _SET_HERE)]
        return cls(host, port, ("\r\n".join(lines) + "\r\n").encode("latin-1"), tls)


@dataclass(slots=True)
class Answer:
    """What came back: the status, and the body when it was not a 200 (a 200's body went to the sink)."""

    status: int
    body: bytes = b""


class StreamClient:
    """Keep-alive connections to one endpoint, any number at once (the run's scheduler bounds concurrency)."""

    def __init__(self, url: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._endpoint = Endpoint.of(url, headers)
        # Built once: loading the CA store per connection would read it from disk every time.
        self._tls = ssl.create_default_context() if self._endpoint.tls else None
        self._idle: list[WorkerConnection] = []
        self._open: set[WorkerConnection] = set()

    async def post(self, body: bytes, sink: Callable[[bytes], None], extra_headers: bytes = b"") -> Answer:
        """Send one POST; a 200's body is handed to `sink` read by read, from the connection's read callback.
        `extra_headers` are whole header lines (`name: value\\r\\n`). A reused connection that the server had
        closed before any answer is replaced once, as clients do for a request the server never saw."""
        request = b"%s%scontent-length: %d\r\n\r\n%s" % (self._endpoint.head, extra_headers, len(body), body)
        connection, reused = await self._connection()
        try:
            try:
                await connection.exchange(request, None)
            except WorkerHungUp:
                if not reused:
                    raise
                connection.close()
                connection, _ = await self._connection(fresh=True)
                await connection.exchange(request, None)
            answer = Answer(connection.status)
            if answer.status == 200:
                await _stream_to(connection, sink)
            else:
                answer.body = await _read_whole(connection)
        except BaseException:
            connection.close()  # unfinished: the server sees the request go away, as it would with aiohttp
            raise
        self._put_back(connection)
        return answer

    async def aclose(self) -> None:
        for connection in (*self._open, *self._idle):
            connection.close()
        self._idle.clear()
        self._open.clear()

    async def _connection(self, fresh: bool = False) -> tuple[WorkerConnection, bool]:
        now = time.monotonic()
        while self._idle and not fresh:
            connection = self._idle.pop()  # the most recent: the least likely to have been closed
            if not connection.closed and now - connection.idle_since < IDLE_EXPIRY_S:
                connection.reset()
                self._open.add(connection)
                return connection, True
            connection.close()
        loop = asyncio.get_running_loop()
        endpoint = self._endpoint
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, connection = await loop.create_connection(lambda: WorkerConnection(loop), endpoint.host,
                                                             endpoint.port, ssl=self._tls)
        except TimeoutError:
            raise WorkerConnectTimeout(f"no connection to {endpoint.host}:{endpoint.port} "
                                       f"in {CONNECT_TIMEOUT_S:g}s") from None
        except OSError as exc:
            raise WorkerUnreachable(f"{endpoint.host}:{endpoint.port}: {exc.strerror or exc}") from exc
        self._open.add(connection)
        return connection, False

    def _put_back(self, connection: WorkerConnection) -> None:
        self._open.discard(connection)
        if connection.reusable:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()


def _taking(sink: Callable[[bytes], None]) -> Callable[[bytes], bool]:
    def take(data: bytes) -> bool:
        sink(data)
        return True

    return take


async def _stream_to(connection: WorkerConnection, sink: Callable[[bytes], None]) -> None:
    """The body to `sink`, every read from the read callback but what arrived with the head (taken here)."""
    take = _taking(sink)
    while data := await connection.read_inline(take):
        sink(data)


async def _read_whole(connection: WorkerConnection) -> bytes:
    chunks = []
    while chunk := await connection.read():
        chunks.append(chunk)
    return b"".join(chunks)

