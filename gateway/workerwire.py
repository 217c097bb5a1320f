"""Worker HTTP stage: HTTP/1.1 to workers on an asyncio Protocol and httptools' parser (the default client).

Why not aiohttp's client here: per streamed chunk it runs its protocol's `data_received`, its parser's chunk
callbacks and its StreamReader's buffer, waiter and read path, and per request a general-purpose request
pipeline. With this module the gateway spends ~18 % less user CPU per event at 100 streams and per 4-token
request (loadtest/results/profile.md, "Worker streams on httptools"). The parsing is httptools' (llhttp, the
parser uvicorn serves with); what is ours is one connection's state and a keep-alive pool per worker.

A connection carries one request at a time. Its body is handed out as the network delivers it; past
`HIGH_WATER` unread bytes the socket stops being read, so a slow client holds back the worker rather than
the gateway's memory. A body read to its end puts the connection back in the pool; any other close drops the
connection, which makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from gateway.settings import GatewaySettings
from gateway.workerhttp import KEEPALIVE_EXPIRY_S, MAX_CACHED_URLS, Sink, WorkerReply

HIGH_WATER = 256 * 1024  # unread body bytes at which the socket stops being read

logger = logging.getLogger("specgate.workerwire")


class WorkerConnectionError(Exception):
    """A connection to a worker failed; the subclass says how (gateway.upstream maps each onto an answer)."""


class WorkerUnreachable(WorkerConnectionError):
    """The connection could not be made: refused, no route, unknown name."""


class WorkerConnectTimeout(WorkerConnectionError):
    """No connection (or no free connection slot) within the connect timeout."""


class WorkerHungUp(WorkerConnectionError):
    """The worker closed the connection before its answer began."""


class WorkerBodyCut(WorkerConnectionError):
    """The worker closed or reset the connection in the middle of its answer."""


class WorkerReadTimeout(WorkerConnectionError):
    """A whole (non-streamed) call: the worker sent nothing within the request timeout."""


class WorkerBadResponse(WorkerConnectionError):
    """What the worker sent is not HTTP/1.1."""


Origin = tuple[str, str, int]  # scheme, host, port


@dataclass(frozen=True, slots=True)
class Target:
    """Where one worker path goes, with the request head's fixed part ready."""

    origin: Origin
    head: bytes  # request line and fixed headers, up to the request id's value


class WorkerConnection(asyncio.Protocol):
    """One keep-alive connection; `exchange()` sends a request and waits for the answer's head, `read()` gives
    the body's chunks and b"" at its end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: list[tuple[str, str]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._unread = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._head_done = False
        self._complete = False
        self._keep_alive = False
        self._error: WorkerConnectionError | None = None
        self._wait_limit_s: float | None = None
        self.status = 0
        self.closed = False
        self.idle_since = 0.0
        self.on_lost: Callable[[WorkerConnection], None] | None = None
        # Set while a `read_inline` waits: takes each network read's body bytes in `data_received`, or refuses.
        self._sink: Sink | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._parser is not None and not self._complete and self._error is None:
            if self._head_done:
                reason = f"{type(exc).__name__}: {exc}" if exc else "closed"
                self._error = WorkerBodyCut(f"the worker's answer ended early ({reason})")
            else:
                self._error = WorkerHungUp("worker closed the connection")
        self._wake()
        if self.on_lost is not None:
            self.on_lost(self)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:
            # Bytes nobody asked for: the connection's state is unknown, so it is not used again.
            self.close()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._error = WorkerBadResponse(f"unreadable answer from the worker: {exc}")
            self.close()
            self._wake()
            return
        if self._sink is not None and self._chunks:
            self._offer(self._sink)

    def _offer(self, sink: Sink) -> None:
        """This network read's body bytes to the sink; refused, they and all that follow until the reader is
        back go through `read`."""
        chunks = self._chunks
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        try:
            taken = sink(body)
        except Exception as exc:
            # Half taken, maybe: these bytes cannot be handed on, so the answer ends here, as a bad one.
            logger.exception("relaying a worker's answer failed")
            self._sink = None
            self._error = WorkerBadResponse(f"the worker's answer could not be relayed ({type(exc).__name__}: {exc})")
            self.close()
            self._wake()
            return
        if taken:
            self._unread = 0
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
        else:
            chunks.append(body)
            self._sink = None
            self._wake()

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost tells the reader

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self.status = self._parser.get_status_code()
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._unread += len(body)
        if self._unread > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self._sink is None:
            self._wake()

    def on_message_complete(self) -> None:
        assert self._parser is not None
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    # the request's side

    async def exchange(self, request: bytes, wait_limit_s: float | None) -> CIMultiDict[str]:
        """Send a whole request; return once the answer's head is in (`status`, then these headers)."""
        assert self.transport is not None
        if self.closed:
            raise WorkerHungUp("worker closed the connection")
        self._parser = httptools.HttpResponseParser(self)
        self._wait_limit_s = wait_limit_s
        self.transport.write(request)
        while not self._head_done:
            await self._wait()
        return CIMultiDict(self._headers)

    async def read(self) -> bytes:
        """Everything received and not yet read (b"" at the body's end): the HTTP chunks of one network read
        come out together, so the relay sends their events to the client in one write."""
        chunks = self._chunks
        while not chunks:
            if self._complete:
                return b""
            await self._wait()
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._unread = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def read_inline(self, sink: Sink) -> bytes:
        """`read`, with `sink` offered each network read's body bytes while it waits: bytes it takes (True) are
        gone, and the first it refuses, with all after them, come out of this read. Ending, failing or
        cancelled, it returns as `read` does."""
        if self._chunks or self._complete:
            return await self.read()
        self._sink = sink
        try:
            return await self.read()
        finally:
            self._sink = None

    @property
    def reusable(self) -> bool:
        """Its answer was read to the end and both sides keep it open."""
        return self._complete and self._keep_alive and not self.closed and not self._chunks

    def reset(self) -> None:
        """Ready for the next request (after a complete answer)."""
        self._parser = None
        self._headers = []
        self._head_done = self._complete = self._keep_alive = False
        self.status = 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        if self._wait_limit_s is None:
            await waiter
        else:
            try:
                async with asyncio.timeout(self._wait_limit_s):
                    await waiter
            except TimeoutError:
                raise WorkerReadTimeout(f"nothing from the worker in {self._wait_limit_s:g}s") from None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class WireWorkerClient:
    """The gateway's WorkerClient over WorkerConnections: a pool of idle keep-alive connections per worker,
    at most `max_upstream_connections` requests at once (a request past that waits up to the connect timeout)."""

    def __init__(self, settings: GatewaySettings, ssl_context: ssl.SSLContext | None = None) -> None:
        self._connect_timeout_s = settings.connect_timeout_s
        self._whole_call_wait_s = settings.request_timeout_s
        self._slots = asyncio.Semaphore(settings.max_upstream_connections)
        self._idle: dict[Origin, list[WorkerConnection]] = {}
        self._targets: dict[tuple[str, str], Target] = {}
        self._ssl_context = ssl_context
        self._closed = False

    async def post(self, worker_url: str, path: str, body: bytes, request_id: str, streaming: bool) -> WorkerReply:
        target = self._target(worker_url, path)
        request = b"%s%s\r\ncontent-length: %d\r\n\r\n%s" % (target.head, request_id.encode("latin-1"), len(body), body)
        await self._take_slot()
        try:
            connection = await self._connection(target.origin)
        except BaseException:
            self._slots.release()
            raise
        release = _Release(self, target.origin, connection)
        try:
            headers = await connection.exchange(request, None if streaming else self._whole_call_wait_s)
        except BaseException:
            await release()
            raise
        return WorkerReply(connection.status, headers, connection.read, release, connection.read_inline)

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _target(self, worker_url: str, path: str) -> Target:
        target = self._targets.get((worker_url, path))
        if target is None:
            if len(self._targets) >= MAX_CACHED_URLS:  # discovery may churn through worker addresses
                self._targets.clear()
            target = self._targets[(worker_url, path)] = build_target(worker_url, path)
        return target

    async def _take_slot(self) -> None:
        if self._slots.locked():
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise WorkerConnectTimeout(f"no free worker connection in {self._connect_timeout_s:g}s") from None
        else:
            await self._slots.acquire()

    async def _connection(self, origin: Origin) -> WorkerConnection:
        idle = self._idle.get(origin)
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                connection = idle.pop()  # the most recent: the least likely to be closed by the worker
                connection.on_lost = None
                if not connection.closed and now - connection.idle_since < KEEPALIVE_EXPIRY_S:
                    connection.reset()
                    return connection
                connection.close()
        return await self._connect(origin)

    async def _connect(self, origin: Origin) -> WorkerConnection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        context = None
        if scheme == "https":
            if self._ssl_context is None:
                # Built once: loading the CA store per connection would read it from disk every time.
                self._ssl_context = ssl.create_default_context()
            context = self._ssl_context
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: WorkerConnection(loop), host, port, ssl=context,
                )
        except TimeoutError:
            raise WorkerConnectTimeout(f"could not connect to {host}:{port} in {self._connect_timeout_s:g}s") from None
        except OSError as exc:
            raise WorkerUnreachable(f"{host}:{port}: {exc.strerror or exc}") from exc
        return connection

    def _put_back(self, origin: Origin, connection: WorkerConnection) -> None:
        if self._closed or not connection.reusable:
            connection.close()
            return
        connection.idle_since = asyncio.get_running_loop().time()
        idle = self._idle.setdefault(origin, [])
        idle.append(connection)

        def forget(lost: WorkerConnection) -> None:
            with contextlib.suppress(ValueError):
                idle.remove(lost)

        connection.on_lost = forget


class _Release:
    """A reply's close: the connection back to the pool (body read to its end) or closed, once."""

    __slots__ = ("_client", "_connection", "_origin")

    def __init__(self, client: WireWorkerClient, origin: Origin, connection: WorkerConnection) -> None:
        self._client: WireWorkerClient | None = client
        self._origin = origin
        self._connection = connection

    async def __call__(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client._put_back(self._origin, self._connection)
            client._slots.release()


def build_target(worker_url: str, path: str) -> Target:
    parts = urlsplit(worker_url + path)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise WorkerUnreachable(f"not an http(s) worker address: {worker_url}")
    port = parts.port or (443 if scheme == "https" else 80)
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {request_target} HTTP/1.1\r\nhost: {netloc}\r\ncontent-type: application/json\r\n"
        "accept-encoding: identity\r\nx-request-id: "
    ).encode("latin-1")
    return Target((scheme, host, port), head)
