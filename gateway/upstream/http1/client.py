"""The product's worker client: HTTP/1.1 to workers over http1/connection.py's connections, a keep-alive pool per
worker, at most `max_upstream_connections` requests at once.

A body read to its end puts its connection back in the pool; any other close drops the connection, which makes
vLLM abort the request. Streams, whole calls and the pool's own small GETs share the pool. The parsing is
httptools' (llhttp, the parser uvicorn serves with); what is ours is one connection's state and the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.settings import GatewaySettings
from gateway.upstream.client import Fetched, WorkerReply
from gateway.upstream.http1.connection import WorkerConnection
from gateway.upstream.http1.errors import WorkerConnectTimeout, WorkerReadTimeout, WorkerUnreachable

Origin = tuple[str, str, int]  # scheme, host, port

# vLLM's uvicorn drops a connection idle for 5 s; reusing one at that moment fails a request that was already
# sent, so the gateway lets idle connections go first.
KEEPALIVE_EXPIRY_S = 4.0
MAX_CACHED_HEADS = 1024  # discovery may churn through worker addresses
MAX_FETCHED_BYTES = 8 * 1024 * 1024  # a metrics page with every histogram of a busy worker fits
POOL_REQUEST_ID = b"specgate-pool"


@dataclass(frozen=True, slots=True)
class RequestHead:
    """Where one worker path goes, with the request head's fixed part ready."""

    origin: Origin
    head: bytes  # request line and fixed headers, up to the request id's value


class Http1WorkerClient:
    """The gateway's WorkerClient over WorkerConnections: a pool of idle keep-alive connections per worker,
    at most `max_upstream_connections` requests at once (a request past that waits up to the connect timeout)."""

    def __init__(self, settings: GatewaySettings, ssl_context: ssl.SSLContext | None = None) -> None:
        self._connect_timeout_s = settings.connect_timeout_s
        self._whole_call_wait_s = settings.request_timeout_s
        self._slots = asyncio.Semaphore(settings.max_upstream_connections)
        self._idle: dict[Origin, list[WorkerConnection]] = {}
        self._heads: dict[tuple[str, str, str], RequestHead] = {}
        self._ssl_context = ssl_context
        self._closed = False

    async def post(self, worker_url: str, path: str, body: bytes, request_id: str, streaming: bool) -> WorkerReply:
        head = self._head("POST", worker_url, path)
        request = b"%s%s\r\ncontent-length: %d\r\n\r\n%s" % (head.head, request_id.encode("latin-1"), len(body), body)
        return await self._send(head.origin, request, None if streaming else self._whole_call_wait_s)

    async def get(self, worker_url: str, path: str, timeout_s: float) -> Fetched:
        head = self._head("GET", worker_url, path)
        try:
            async with asyncio.timeout(timeout_s):
                reply = await self._send(head.origin, head.head + POOL_REQUEST_ID + b"\r\n\r\n", timeout_s)
                try:
                    return Fetched(reply.status, await reply.body(MAX_FETCHED_BYTES))
                finally:
                    await reply.aclose()
        except TimeoutError:
            raise WorkerReadTimeout(f"worker sent nothing in time ({timeout_s:g}s)") from None

    async def _send(self, origin: Origin, request: bytes, wait_limit_s: float | None) -> WorkerReply:
        await self._take_slot()
        try:
            connection = await self._connection(origin)
        except BaseException:
            self._slots.release()
            raise
        release = _Release(self, origin, connection)
        try:
            headers = await connection.exchange(request, wait_limit_s)
        except BaseException:
            await release()
            raise
        return WorkerReply(connection.status, headers, connection.read, release, connection.read_inline,
                           connection.read_first_inline)

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _head(self, method: str, worker_url: str, path: str) -> RequestHead:
        head = self._heads.get((method, worker_url, path))
        if head is None:
            if len(self._heads) >= MAX_CACHED_HEADS:
                self._heads.clear()
            head = self._heads[(method, worker_url, path)] = build_head(method, worker_url, path)
        return head

    async def _take_slot(self) -> None:
        if self._slots.locked():
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise WorkerConnectTimeout(
                    f"could not connect to worker in time: no free connection in {self._connect_timeout_s:g}s"
                ) from None
        else:
            await self._slots.acquire()

    async def _connection(self, origin: Origin) -> WorkerConnection:
        idle = self._idle.get(origin)
        connection = take_idle(idle) if idle else None
        if connection is not None:
            return connection
        scheme, host, port = origin
        context = None
        if scheme == "https":
            if self._ssl_context is None:
                # Built once: loading the CA store per connection would read it from disk every time.
                self._ssl_context = ssl.create_default_context()
            context = self._ssl_context
        return await connect(host, port, context, self._connect_timeout_s)

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

    def __init__(self, client: Http1WorkerClient, origin: Origin, connection: WorkerConnection) -> None:
        self._client: Http1WorkerClient | None = client
        self._origin = origin
        self._connection = connection

    async def __call__(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client._put_back(self._origin, self._connection)
            client._slots.release()


@dataclass(frozen=True, slots=True)
class HttpUrl:
    """An http(s) URL split as a request needs it: where to connect, the host header, the request target."""

    scheme: str
    host: str
    port: int
    netloc: str
    target: str

    @classmethod
    def parse(cls, url: str) -> HttpUrl | None:
        """None for anything but an http(s) URL with a host."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            return None
        host = parts.hostname
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port is not None else "")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(scheme, host, parts.port or (443 if scheme == "https" else 80), netloc, target)


def build_head(method: str, worker_url: str, path: str) -> RequestHead:
    url = HttpUrl.parse(worker_url + path)
    if url is None:
        raise WorkerUnreachable(f"could not connect to worker: not an http(s) address: {worker_url}")
    fixed = f"{method} {url.target} HTTP/1.1\r\nhost: {url.netloc}\r\n"
    if method == "POST":
        fixed += "content-type: application/json\r\n"
    head = (fixed + "accept-encoding: identity\r\nx-request-id: ").encode("latin-1")
    return RequestHead((url.scheme, url.host, url.port), head)


def take_idle(idle: list[WorkerConnection]) -> WorkerConnection | None:
    """The most recently idled connection still fit to reuse (the least likely to have been closed by the
    server), ready for a request; the stale ones passed over are closed."""
    now = asyncio.get_running_loop().time()
    while idle:
        connection = idle.pop()
        connection.on_lost = None
        if not connection.closed and now - connection.idle_since < KEEPALIVE_EXPIRY_S:
            connection.reset()
            return connection
        connection.close()
    return None


async def connect(host: str, port: int, ssl_context: ssl.SSLContext | None, timeout_s: float) -> WorkerConnection:
    """A new connection, its failures as WorkerConnectTimeout or WorkerUnreachable."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            _, connection = await loop.create_connection(lambda: WorkerConnection(loop), host, port, ssl=ssl_context)
    except TimeoutError:
        raise WorkerConnectTimeout(f"could not connect to worker in time: {host}:{port} in {timeout_s:g}s") from None
    except OSError as exc:
        raise WorkerUnreachable(f"could not connect to worker: {host}:{port}: {exc.strerror or exc}") from exc
    return connection
