"""Upstream stage: the HTTP client to workers, with pooled connections and explicit timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import anyio
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

from gateway.cutoff import DeadlinePassed, WaitGuard, WaitTooLong
from gateway.errors import (
    GatewayError,
    NoWorkerAvailable,
    ShuttingDown,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
)
from gateway.settings import GatewaySettings
from gateway.sse import Event, EventSplitter

MAX_ERROR_BODY = 64 * 1024
MAX_CACHED_URLS = 1024
CLOSED_STREAM = httpx.ByteStream(b"")  # stands in for a closed response's stream; holds nothing


# vLLM's uvicorn drops a connection idle for 5 s; reusing one at that moment fails a POST that aiohttp
# will not resend, so the gateway lets idle connections go first.
KEEPALIVE_EXPIRY_S = 4.0


def build_transport(settings: GatewaySettings) -> httpx.AsyncBaseTransport:
    """The connection pool to workers: aiohttp's by default, behind httpx's API.

    httpcore's pool rescans every pooled connection on each request start and close, so with hundreds of
    open streams it spends half the gateway's CPU there (loadtest/results/upstream-client.md); aiohttp's
    pool is a per-host queue. `upstream_transport: httpcore` keeps httpx's own pool.
    """
    if settings.upstream_transport == "httpcore":
        # Few idle connections: that rescan makes a large idle pool cost more than the connects it saves.
        limits = httpx.Limits(
            max_connections=settings.max_upstream_connections,
            max_keepalive_connections=min(settings.upstream_keepalive_connections, settings.max_upstream_connections),
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        )
        return httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    limits = httpx.Limits(max_connections=settings.max_upstream_connections, keepalive_expiry=KEEPALIVE_EXPIRY_S)
    return AiohttpTransport(limits=limits, trust_env=False)


def client_timeout(settings: GatewaySettings) -> httpx.Timeout:
    return httpx.Timeout(
        connect=settings.connect_timeout_s,
        read=settings.stream_idle_timeout_s,
        write=settings.connect_timeout_s,
        pool=settings.connect_timeout_s,
    )


def build_client(settings: GatewaySettings, transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    """The client for the pool's own calls to workers (health, models, metrics); it owns and closes `transport`."""
    return httpx.AsyncClient(timeout=client_timeout(settings), transport=transport, trust_env=False)


Read = Callable[[], Awaitable[bytes]]  # the next network chunk of a body; b"" at its end


@dataclass(eq=False)
class OpenStream:
    """A worker stream whose status was 200 and whose first event has arrived."""

    response: httpx.Response
    read: Read
    splitter: EventSplitter
    first_events: list[Event]
    sent_at: float
    first_event_at: float
    closed: bool = field(default=False)
    # Bounds each read by the idle timeout and, once the drainer sets one, by the shutdown deadline.
    guard: WaitGuard = field(default_factory=WaitGuard)

    async def next_chunk(self) -> bytes:
        """The next network chunk, b"" at the end of the body; every failure as one of the gateway's errors."""
        guard = self.guard
        try:
            guard.begin()
            try:
                return await self.read()
            except asyncio.CancelledError:
                guard.raise_if_cut()
                raise
            finally:
                guard.end()
        except DeadlinePassed:
            raise ShuttingDown("the gateway is shutting down; retry the request") from None
        except WaitTooLong:
            raise UpstreamTimeout(f"worker sent nothing for {guard.limit_s:g}s") from None
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise map_transport_error(exc) from exc

    def end_by(self, deadline: float) -> None:
        self.guard.end_by(deadline)

    async def aclose(self) -> None:
        """Close the worker connection; shielded so a cancelled caller still makes vLLM abort."""
        if self.closed:
            return
        self.closed = True
        self.guard.close()
        await close_response(self.response)


def reader_of(chunks: AsyncIterator[bytes]) -> Read:
    """A Read over an async iterator of chunks (httpx's, or a test's)."""
    async def read() -> bytes:
        try:
            return await anext(chunks)
        except StopAsyncIteration:
            return b""

    return read


def body_reader(response: httpx.Response) -> Read:
    """How the relay reads a worker's streamed body.

    Over the aiohttp transport with identity encoding (what workers are asked for), straight from aiohttp's
    reader: each chunk then costs one call instead of a resumption of five layered iterators (httpx's raw
    iterator, its client's bound stream, httpx-aiohttp's generator, aiohttp's chunk iterator and read), none of
    which the relay needs. Any other transport (httpcore, a test's MockTransport), a compressed body or one
    already read goes through httpx's iterators.
    """
    encoding = response.headers.get("content-encoding", "identity")
    if encoding == "identity" and not response.is_stream_consumed:
        if isinstance(response.stream, AiohttpResponseStream):
            content: aiohttp.StreamReader = response.stream._aiohttp_response.content
            return content.readany
        return reader_of(response.aiter_raw())
    return reader_of(response.aiter_bytes())


class Upstream:
    """Sends one request to one worker and maps every failure onto the gateway's error tree.

    Requests go straight to the transport: httpx.AsyncClient.send would add its cookie jar (parsing every
    response's headers for cookies, ~2 % of the gateway's CPU on short requests), redirect and auth handling
    and a timing wrapper around the body, none of which a worker call uses.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, settings: GatewaySettings,
                 clock: Callable[[], float]) -> None:
        self._transport = transport
        self._settings = settings
        self._clock = clock
        # No read timeout on streams: aiohttp would re-arm a timer on every chunk (~3.5 µs each); each stream's
        # WaitGuard bounds its reads instead, and open_stream bounds the wait for the first event.
        self._stream_timeout = {**client_timeout(settings).as_dict(), "read": None}
        self._complete_timeout = httpx.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s).as_dict()
        self._targets: dict[tuple[str, str], tuple[httpx.URL, bytes]] = {}

    def _request(self, worker_url: str, path: str, body: bytes, request_id: str, timeout: dict[str, float | None],
                 ) -> httpx.Request:
        # Built from raw header pairs and a ready body stream: httpx.Request's own normalising of a header dict and
        # encoding of `content` took 24 µs per request start, this 7.5 (client.build_request, which also merges
        # the client's defaults and cookies, took 59). Workers need nothing else.
        target = self._targets.get((worker_url, path))
        if target is None:
            if len(self._targets) >= MAX_CACHED_URLS:  # discovery may churn through worker addresses
                self._targets.clear()
            url = httpx.URL(worker_url + path)
            target = self._targets.setdefault((worker_url, path), (url, url.netloc))
        url, host = target
        headers = [
            (b"host", host), (b"content-type", b"application/json"), (b"accept-encoding", b"identity"),
            (b"x-request-id", request_id.encode("latin-1")), (b"content-length", b"%d" % len(body)),
        ]
        request = httpx.Request("POST", url, stream=httpx.ByteStream(body), headers=headers,
                                extensions={"timeout": timeout})
        request.read()  # the body as bytes too: httpx-aiohttp sends `request.content`
        return request

    async def open_stream(self, worker_url: str, path: str, body: bytes, request_id: str) -> OpenStream:
        """Send the request and wait, within the first-token timeout, for a 200 and the first event."""
        request = self._request(worker_url, path, body, request_id, self._stream_timeout)
        sent_at = self._clock()
        limit = self._settings.first_token_timeout_s
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(limit):
                response = await _send(self._transport, request)
                if response.status_code != 200:
                    raise await _status_error(response)
                read = body_reader(response)
                splitter = EventSplitter()
                events: list[Event] = []
                while not events:
                    chunk = await read()
                    if not chunk:
                        raise StopAsyncIteration
                    events = [Event.parse(raw) for raw in splitter.feed(chunk)]
            guard = WaitGuard(self._settings.stream_idle_timeout_s)
            return OpenStream(response, read, splitter, events, sent_at, self._clock(), guard=guard)
        except BaseException as exc:
            if response is not None:
                await close_response(response)
            if isinstance(exc, StopAsyncIteration):
                raise UpstreamFailed("worker closed the stream before its first event") from None
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(f"no first event from the worker within {limit:g}s") from None
            if isinstance(exc, (httpx.HTTPError, aiohttp.ClientError)):
                raise map_transport_error(exc) from exc
            raise

    async def complete(self, worker_url: str, path: str, body: bytes, request_id: str) -> httpx.Response:
        """A non-streaming call: the whole answer, read, with status 200."""
        request = self._request(worker_url, path, body, request_id, self._complete_timeout)
        response = await _send(self._transport, request)
        try:
            if response.status_code != 200:
                raise await _status_error(response)
            await response.aread()
            return response
        except httpx.HTTPError as exc:
            raise map_transport_error(exc) from exc
        finally:
            await close_response(response)


async def close_response(response: httpx.Response) -> None:
    """Close a worker response, shielded so a cancelled caller still makes vLLM abort, and unlink its stream.

    A response that went through httpx.AsyncClient has its stream bound back to it: a reference cycle that
    kept each request's ~26 objects (aiohttp's response and reader among them) alive until a garbage
    collection. Requests outlive the young generations, so that garbage piled up for full collections, which
    freed thousands of objects at once: pauses of ~30 ms for every open stream (loadtest/results/profile.md).
    Worker calls now go straight to the transport, which makes no such cycle; unlinking keeps any response
    (a test transport's, a future client path) from holding its body's objects after the close.
    """
    with anyio.CancelScope(shield=True):
        await response.aclose()
    response.stream = CLOSED_STREAM


async def fetch(client: httpx.AsyncClient, url: str, timeout_s: float) -> httpx.Response:
    """A small GET read whole (health, model list, metrics page), its stream unlinked as in close_response."""
    response = await client.get(url, timeout=timeout_s)
    response.stream = CLOSED_STREAM
    return response


async def _send(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> httpx.Response:
    try:
        return await transport.handle_async_request(request)
    except httpx.HTTPError as exc:
        raise map_transport_error(exc) from exc


async def _status_error(response: httpx.Response) -> GatewayError:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= MAX_ERROR_BODY:
            break
    status = response.status_code
    if 400 <= status < 500 and status not in (408, 429):
        return UpstreamRejected(status, body, response.headers.get("content-type"))
    detail = body.decode("utf-8", "replace")[:300]
    if status in (429, 503):
        return NoWorkerAvailable(f"worker is busy or draining ({status}): {detail}", retry_after_s=1)
    if status == 408:
        return UpstreamTimeout(f"worker timed out: {detail}")
    return UpstreamFailed(f"worker answered {status}: {detail}")


def map_transport_error(exc: httpx.HTTPError | aiohttp.ClientError) -> GatewayError:
    # httpx_aiohttp reports every aiohttp connection error, a worker hanging up included, as ConnectTimeout;
    # a body read straight from aiohttp (body_reader) raises aiohttp's own errors.
    cause = exc if isinstance(exc, aiohttp.ClientError) else exc.__cause__
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return UpstreamFailed("worker closed the connection")
    if isinstance(cause, aiohttp.ClientPayloadError):
        return UpstreamFailed(f"worker closed or reset the connection mid-body ({cause})")
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamFailed(f"worker connection failed: {type(exc).__name__}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            return UpstreamFailed(f"could not connect to worker in time: {type(exc).__name__}")
        return UpstreamTimeout(f"worker sent nothing in time: {type(exc).__name__}")
    if isinstance(exc, httpx.ReadError):
        # httpcore's ReadError is the socket failing under a read: a worker that reset or closed the connection.
        return UpstreamFailed(f"worker closed or reset the connection ({type(exc).__name__}: {exc})")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamFailed(f"could not connect to worker: {exc}")
    return UpstreamFailed(f"worker connection failed: {type(exc).__name__}: {exc}")
