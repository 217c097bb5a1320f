"""Worker HTTP stage: what a worker call returns (`WorkerReply`), and the clients over aiohttp and over httpx.

The default client is http1/client.py's; each gives the same `WorkerReply` and raises its own errors, which
`gateway.upstream.calls.map_transport_error` maps onto the gateway's error tree.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import anyio
import httpx
import yarl

from gateway.settings import GatewaySettings

Read = Callable[[], Awaitable[bytes]]  # the next network chunk of a body; b"" at its end
Sink = Callable[[bytes], bool]  # takes body bytes as they arrive (True), or refuses them to the reader
ReadInline = Callable[[Sink], Awaitable[bytes]]  # a Read that offers arriving bytes to a Sink while it waits
# A ReadInline that returns None once the Sink has taken one network read.
ReadFirstInline = Callable[[Sink], Awaitable[bytes | None]]

MAX_CACHED_URLS = 1024
CLOSED_STREAM = httpx.ByteStream(b"")  # stands in for a closed response's stream; holds nothing

# vLLM's uvicorn drops a connection idle for 5 s; reusing one at that moment fails a POST that aiohttp
# will not resend, so the gateway lets idle connections go first.
KEEPALIVE_EXPIRY_S = 4.0


@dataclass(eq=False, slots=True)
class WorkerReply:
    """A worker's answer, its status line and headers in; `read` gives the body chunk by chunk."""

    status: int
    headers: Mapping[str, str]  # looked up case-insensitively
    read: Read
    close: Callable[[], Awaitable[None]]
    # Only the default client's connections (http1/connection.py) can hand bytes over from its read callback.
    read_inline: ReadInline | None = None
    read_first_inline: ReadFirstInline | None = None

    async def aclose(self) -> None:
        """Close it; shielded so a cancelled caller still makes vLLM abort an unfinished stream."""
        with anyio.CancelScope(shield=True):
            await self.close()

    async def body(self, limit: int | None = None) -> bytes:
        """The whole body, or with a limit its first `limit` bytes and at most one chunk more."""
        chunks: list[bytes] = []
        size = 0
        while (limit is None or size < limit) and (chunk := await self.read()):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)


class WorkerClient(Protocol):
    async def post(self, worker_url: str, path: str, body: bytes, request_id: str, streaming: bool) -> WorkerReply:
        """POST a JSON body; a streamed answer has no read timeout (the relay bounds its reads itself)."""
        ...


class AiohttpWorkerClient:
    """aiohttp's client session, called directly.

    Through httpx's API (httpx-aiohttp) each request was an httpx.Request turned into a URL string and a header
    dict for aiohttp, which parsed both again, and each answer an httpx.Response around aiohttp's: building
    and writing a lone request took 0.38-0.44 ms that way, 0.27-0.30 ms now (loadtest/results/profile.md,
    "Worker calls on aiohttp itself").
    """

    def __init__(self, session: aiohttp.ClientSession, settings: GatewaySettings) -> None:
        self._session = session
        # The same bounds httpx's timeouts gave through httpx-aiohttp: connect, pool wait, and for whole calls
        # the gap between reads.
        self._streaming_timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout_s, sock_connect=settings.connect_timeout_s,
        )
        self._whole_timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.request_timeout_s, sock_connect=settings.connect_timeout_s,
            sock_read=settings.request_timeout_s,
        )
        self._urls: dict[tuple[str, str], yarl.URL] = {}

    def _url(self, worker_url: str, path: str) -> yarl.URL:
        url = self._urls.get((worker_url, path))
        if url is None:
            if len(self._urls) >= MAX_CACHED_URLS:  # discovery may churn through worker addresses
                self._urls.clear()
            url = self._urls[(worker_url, path)] = yarl.URL(worker_url + path)
        return url

    async def post(self, worker_url: str, path: str, body: bytes, request_id: str, streaming: bool) -> WorkerReply:
        response = await self._session.request(
            "POST", self._url(worker_url, path), data=body, allow_redirects=False,
            headers={"content-type": "application/json", "accept-encoding": "identity", "x-request-id": request_id},
            timeout=self._streaming_timeout if streaming else self._whole_timeout,
        )
        return WorkerReply(response.status, response.headers, response.content.readany,
                           functools.partial(_release, response))


async def _release(response: aiohttp.ClientResponse) -> None:
    # An unfinished body closes the connection, which makes vLLM abort; a finished one goes back to the pool.
    response.release()
    await response.wait_for_close()


class HttpxWorkerClient:
    """Any httpx transport: httpx's own pool (`upstream_transport: httpcore`) or a test's MockTransport.

    Requests go straight to the transport: httpx.AsyncClient.send would add its cookie jar (parsing every
    response's headers for cookies), redirect and auth handling and a timing wrapper around the body, none of
    which a worker call uses.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, settings: GatewaySettings) -> None:
        self._transport = transport
        self._streaming_timeout = {**client_timeout(settings).as_dict(), "read": None}
        self._whole_timeout = httpx.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s).as_dict()
        self._targets: dict[tuple[str, str], tuple[httpx.URL, bytes]] = {}

    def _request(self, worker_url: str, path: str, body: bytes, request_id: str, streaming: bool) -> httpx.Request:
        # Built from raw header pairs and a ready body stream: httpx.Request's own normalising of a header dict and
        # encoding of `content` took 24 µs per request start, this 7.5.
        target = self._targets.get((worker_url, path))
        if target is None:
            if len(self._targets) >= MAX_CACHED_URLS:
                self._targets.clear()
            url = httpx.URL(worker_url + path)
            target = self._targets.setdefault((worker_url, path), (url, url.netloc))
        url, host = target
        headers = [
            (b"host", host), (b"content-type", b"application/json"), (b"accept-encoding", b"identity"),
            (b"x-request-id", request_id.encode("latin-1")), (b"content-length", b"%d" % len(body)),
        ]
        timeout = self._streaming_timeout if streaming else self._whole_timeout
        request = httpx.Request("POST", url, stream=httpx.ByteStream(body), headers=headers,
                                extensions={"timeout": timeout})
        request.read()  # the body as bytes too, for transports that send `request.content`
        return request

    async def post(self, worker_url: str, path: str, body: bytes, request_id: str, streaming: bool) -> WorkerReply:
        response = await self._transport.handle_async_request(
            self._request(worker_url, path, body, request_id, streaming)
        )
        return WorkerReply(response.status_code, response.headers, body_reader(response),
                           functools.partial(close_response, response))


def body_reader(response: httpx.Response) -> Read:
    """An httpx response's body as a Read: raw when sent as is, decoded when compressed."""
    if response.headers.get("content-encoding", "identity") == "identity" and not response.is_stream_consumed:
        return reader_of(response.aiter_raw())
    return reader_of(response.aiter_bytes())


def reader_of(chunks: AsyncIterator[bytes]) -> Read:
    """A Read over an async iterator of chunks (httpx's, or a test's)."""
    async def read() -> bytes:
        try:
            return await anext(chunks)
        except StopAsyncIteration:
            return b""

    return read


async def close_response(response: httpx.Response) -> None:
    """Close an httpx response and unlink its stream.

    A response that went through httpx.AsyncClient has its stream bound back to it: a reference cycle that kept
    each request's objects alive until a garbage collection, whose pauses of ~30 ms hit every open stream
    (loadtest/results/profile.md). Worker calls make no such cycle; unlinking keeps any response (a test
    transport's, the pool's own calls) from holding its body's objects after the close.
    """
    await response.aclose()
    response.stream = CLOSED_STREAM


async def fetch(client: httpx.AsyncClient, url: str, timeout_s: float) -> httpx.Response:
    """A small GET read whole (health, model list, metrics page), its stream unlinked as in close_response."""
    response = await client.get(url, timeout=timeout_s)
    response.stream = CLOSED_STREAM
    return response


def client_timeout(settings: GatewaySettings) -> httpx.Timeout:
    return httpx.Timeout(
        connect=settings.connect_timeout_s,
        read=settings.stream_idle_timeout_s,
        write=settings.connect_timeout_s,
        pool=settings.connect_timeout_s,
    )


def aiohttp_session(settings: GatewaySettings) -> aiohttp.ClientSession:
    """aiohttp's pool: a queue per worker, so hundreds of open streams cost nothing at each request start.

    (httpcore's pool rescans every pooled connection on each request start and close: with hundreds of open
    streams half the gateway's CPU went there, loadtest/results/upstream-client.md.) Workers set no cookies,
    so no jar looks at every response.
    """
    connector = aiohttp.TCPConnector(limit=settings.max_upstream_connections, keepalive_timeout=KEEPALIVE_EXPIRY_S)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)


def httpcore_transport(settings: GatewaySettings) -> httpx.AsyncBaseTransport:
    """httpx's own pool, with few idle connections: its rescan makes a large idle pool cost more than the
    connects it saves."""
    limits = httpx.Limits(
        max_connections=settings.max_upstream_connections,
        max_keepalive_connections=min(settings.upstream_keepalive_connections, settings.max_upstream_connections),
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )
    return httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
