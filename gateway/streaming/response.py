"""A stream's response: sse-starlette's EventSourceResponse, run with less machinery per stream.

The stream is sent from the request's own task, with no task group: the client is watched by the request's one
ClientWatch (admission/client_watch.py) and one WaitGuard bounds the writes (admission/deadlines.py), where
sse-starlette would put a cancel scope around every write and run four tasks per response, every hand-off
between them an event-loop turn (docs/design/performance.md, "Plain tasks instead of sse-starlette's task
group"). Pings start from a timer, since most streams end before their first ping is due. The send lock only
orders pings against the stream's last write, so a stream that never pinged ends without it (taking an anyio
lock costs an event-loop turn). sse-starlette's shutdown listener is not started: the gateway's drainer ends
streams on shutdown with an error event (admission/shutdown.py). The event framing, ping messages, ping loop
and send lock are sse-starlette's.

The response start goes through the whole middleware chain (it stamps the request id); the body goes straight
to the server's `send` (`TRANSPORT_SEND`, put in the scope by the app): the wrappers between them only act on
the start, and would cost a coroutine each per event. The start and the events the stream opened on leave in
one write (`writes_joined`): one syscall and one client wake-up less per stream. Once the start is out, the
source is handed a direct writer for the same response (`write_directly`, uvicorn_fast_path.py): events that
arrive while the stream waits are written from the worker connection's read callback, and only what that cannot
write comes through this send loop. Where the stream opened from that callback (`inline_opener`: the head and
the first events written there as soon as they arrived), the response only sends what follows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any, Protocol

from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.event import ensure_bytes
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from gateway.admission.client_watch import ClientWatch
from gateway.admission.deadlines import WaitGuard
from gateway.errors import ClientDisconnected, WaitTooLong
from gateway.middleware.fast_routes import APP_SEND
from gateway.streaming.uvicorn_fast_path import (
    DirectBodyWriter,
    ResponseOpener,
    abort_connection,
    direct_body_writer,
    response_opener,
    writes_joined,
)

TRANSPORT_SEND = "specgate.transport_send"


class StreamSource(Protocol):
    """What the response sends: a stream's bytes (`events()`, already framed), whether the chunk it holds out is
    the last (`final`), the bytes the stream opened on (`opening()`), a writer for the fast path
    (`write_directly`), and what to run once the response is complete (`settle()`). `Stream` (stream.py) is one."""

    final: bool

    def events(self) -> AsyncGenerator[bytes, None]: ...

    def opening(self) -> bytes | None: ...

    def write_directly(self, writer: DirectBodyWriter) -> None: ...

    async def settle(self) -> None: ...


class StreamResponse(EventSourceResponse):
    """The response of one stream: `source` is sent to the client, and settled once the response is complete,
    whatever ended it."""

    def __init__(self, source: StreamSource, *, watch: ClientWatch, **kwargs: Any) -> None:
        content = source.events()
        super().__init__(content, **kwargs)
        self._content = content
        self._source = source
        self._watch = watch
        # A reader that takes no bytes for send_timeout is cut: one write waits that long under flow control.
        self._send_guard = WaitGuard(self.send_timeout or None)
        self._pings: asyncio.Task[None] | None = None

    def set_header(self, name: bytes, value: bytes) -> None:
        """Set a header before the response starts (the start, inline or not, sends this same list)."""
        self.raw_headers[:] = [(key, old) for key, old in self.raw_headers if key != name]
        self.raw_headers.append((name, value))

    def inline_opener(self, scope: Scope) -> ResponseOpener | None:
        """An opener that starts this response from a worker's read callback (uvicorn_fast_path.py), with its
        start sent through the app's `send` as `__call__` would send it; None off uvicorn's httptools server."""
        server_send, app_send = scope.get(TRANSPORT_SEND), scope.get(APP_SEND)
        if server_send is None or app_send is None:
            return None
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        return response_opener(server_send, app_send, start)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_send: Send = scope.get(TRANSPORT_SEND, send)
        ping_due = None
        if self.ping_interval > 0:
            ping_due = asyncio.get_running_loop().call_later(self.ping_interval, self._start_pings, body_send)
        try:
            with self._watch.guard():
                await self._send_stream(send, body_send)
        except ClientDisconnected:
            pass  # the relay saw the cancellation and closed the worker request
        except SendTimeoutError:
            # A reader that took nothing for the send timeout: what is queued for it is dropped with its
            # connection (a close would wait to send it), and the worker request is closed below.
            abort_connection(body_send)
        finally:
            self.active = False
            if ping_due is not None:
                ping_due.cancel()
            if self._pings is not None:
                self._pings.cancel()
            self._send_guard.close()
            await self._watch.stop()
            with contextlib.suppress(Exception):
                await self._content.aclose()
            await self._source.settle()

    def _start_pings(self, body_send: Send) -> None:
        if self.active:
            self._pings = asyncio.get_running_loop().create_task(self._ping_now_and_on(body_send))

    async def _ping_now_and_on(self, body_send: Send) -> None:
        """One ping now (the timer waited the first interval), then sse-starlette's loop: sleep, ping."""
        ping = self.ping_message_factory() if self.ping_message_factory else ServerSentEvent(
            comment=f"ping - {datetime.now(UTC)}", sep=self.sep
        )
        async with self._send_lock:
            if self.active:
                await self._send_with_timeout(
                    body_send, {"type": "http.response.body", "body": ensure_bytes(ping, self.sep), "more_body": True}
                )
        await self._ping(body_send)

    async def _send_stream(self, send: Send, body_send: Send) -> None:
        opening = self._source.opening()
        ended = False
        # None: the head and the first events went out from the worker's read callback, and the relay writes on.
        if opening is not None:
            with writes_joined(body_send):  # the head and the events the stream opened on, in one write
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                if opening:
                    ended = await self._send_chunk(body_send, opening)
            if not ended:
                writer = direct_body_writer(body_send)
                if writer is not None:
                    self._source.write_directly(writer)
        async for chunk in self._content:  # the relay's bytes, framed already
            if not ended:  # nothing follows the body's end; the content only runs on to its own end
                ended = await self._send_chunk(body_send, chunk)
        if not ended:
            await self._send_end(body_send, b"")

    async def _send_chunk(self, body_send: Send, chunk: bytes) -> bool:
        """Send one chunk of the body; True if it was the last, sent with the body's end."""
        if self._source.final:
            # The last chunk and the body's end leave in one write (one syscall, one client wake-up less).
            await self._send_end(body_send, chunk)
            return True
        await self._send_guarded(body_send, {"type": "http.response.body", "body": chunk, "more_body": True})
        return False

    async def _send_end(self, body_send: Send, chunk: bytes) -> None:
        # Without a ping task nothing else writes, and none starts now (it checks `active` under the lock).
        async with self._send_lock if self._pings is not None else contextlib.nullcontext():
            self.active = False
            # Stopped first: uvicorn answers receive() with a disconnect once the response is complete.
            await self._watch.stop()
            await self._send_guarded(body_send, {"type": "http.response.body", "body": chunk, "more_body": False})

    async def _send_guarded(self, body_send: Send, message: Message) -> None:
        """One write, cut after send_timeout if the client takes no bytes (flow control holds it that long)."""
        guard = self._send_guard
        guard.begin()
        try:
            await body_send(message)
        except asyncio.CancelledError:
            try:
                guard.raise_if_cut()
            except WaitTooLong:
                raise SendTimeoutError() from None
            raise
        finally:
            guard.end()
