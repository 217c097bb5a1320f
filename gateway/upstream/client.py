"""The one seam between the gateway and its workers: `WorkerClient` and what its calls return.

The product's client is upstream/http1 (HTTP/1.1 on httptools, keep-alive connections per worker); tests use
upstream/mock.py's in-memory one. Every failure a client raises is one of gateway/errors.py's upstream errors
(`UpstreamFailed`, `UpstreamTimeout` and their subclasses), so nothing above this seam knows a client's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import anyio

Read = Callable[[], Awaitable[bytes]]  # the next network chunk of a body; b"" at its end
Sink = Callable[[bytes], bool]  # takes body bytes as they arrive (True), or refuses them to the reader
ReadInline = Callable[[Sink], Awaitable[bytes]]  # a Read that offers arriving bytes to a Sink while it waits
# A ReadInline that returns None once the Sink has taken one network read.
ReadFirstInline = Callable[[Sink], Awaitable[bytes | None]]


@dataclass(eq=False, slots=True)
class WorkerReply:
    """A worker's answer, its status line and headers in; `read` gives the body chunk by chunk."""

    status: int
    headers: Mapping[str, str]  # looked up case-insensitively
    read: Read
    close: Callable[[], Awaitable[None]]
    # Clients that can hand bytes over from their read callback (upstream/http1) set these.
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


@dataclass(frozen=True, slots=True)
class Fetched:
    """A small answer read whole: a health check, a model list, a metrics page."""

    status: int
    body: bytes


class WorkerClient(Protocol):
    async def post(self, worker_url: str, path: str, body: bytes, request_id: str, streaming: bool) -> WorkerReply:
        """POST a JSON body; a streamed answer has no read timeout (the relay bounds its reads itself)."""
        ...

    async def get(self, worker_url: str, path: str, timeout_s: float) -> Fetched:
        """GET a small answer whole within `timeout_s` (the pool's health checks, model lists, load scrapes)."""
        ...

    async def aclose(self) -> None:
        """Close every idle connection; the client takes no more calls."""
        ...


def reader_of(chunks: AsyncIterator[bytes]) -> Read:
    """A Read over an async iterator of chunks."""

    async def read() -> bytes:
        try:
            return await anext(chunks)
        except StopAsyncIteration:
            return b""

    return read
