"""One HTTP/1.1 connection to a worker: an asyncio Protocol on httptools' parser (client.py pools them).

A connection carries one request at a time. Its body is handed out as the network delivers it; past
`HIGH_WATER` unread bytes the socket stops being read, so a slow client holds back the worker rather than
the gateway's memory. While a reader waits in `read_inline`, each network read's body is offered to its sink
first (the relay writes it to the client from here, streaming/uvicorn_fast_path.py); `read_first_inline` does the same
for a stream's first bytes, and lets its reader go once they are taken.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Callable
from typing import cast

import httptools
from multidict import CIMultiDict

from gateway.upstream.client import Sink
from gateway.upstream.http1.errors import (
    WorkerBadResponse,
    WorkerBodyCut,
    WorkerConnectionError,
    WorkerHungUp,
    WorkerReadTimeout,
)

HIGH_WATER = 8 * 1024  # unread body bytes at which the socket stops being read

logger = logging.getLogger("specgate.upstream")


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
        # Set while a `read_first_inline` waits: the first read the sink takes releases the reader.
        self._release_on_take = False
        self._taken = False

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
                self._error = WorkerBodyCut(f"worker closed or reset the connection mid-body ({reason})")
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
        body = self._take_chunks()
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
            self._handed_on()
            if self._release_on_take:
                self._taken = True
                self._sink = None
                self._wake()
        else:
            self._chunks.append(body)
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
        data = self._take_chunks()
        self._handed_on()
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

    async def read_first_inline(self, sink: Sink) -> bytes | None:
        """`read_inline` for a stream's first bytes: None as soon as `sink` takes a network read (the reader is
        released then, not at the next one); what it refuses, with all after it, as `read` gives it."""
        if self._chunks or self._complete:
            return await self.read()
        self._sink, self._release_on_take, self._taken = sink, True, False
        try:
            while not self._taken:
                if self._chunks:
                    data = self._take_chunks()
                    self._handed_on()
                    return data
                if self._complete:
                    return b""
                await self._wait()
            return None
        finally:
            self._sink, self._release_on_take, self._taken = None, False, False

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

    def _take_chunks(self) -> bytes:
        """The body bytes received and not yet handed on, as one."""
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return data

    def _handed_on(self) -> None:
        """What was received has left (to the reader or the sink): take more from the worker."""
        self._unread = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

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
                raise WorkerReadTimeout(f"worker sent nothing in time ({self._wait_limit_s:g}s)") from None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
