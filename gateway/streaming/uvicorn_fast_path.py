"""Writes a streamed body's chunks to the client's socket from a worker's read callback, as uvicorn frames them.

Through the request's task, each event would take a wake-up, the stream's generator, the response's send loop
and the server's `send` coroutine before one `transport.write`. While the client takes bytes as fast as they
come, none of that decides anything: the stream frames the chunk and writes it from the worker connection's own
`data_received` (upstream/http1/connection.py, `read_inline`), and the task only wakes for what needs it (the
stream's end, an error, a client that has stopped reading, a worker that failed) (docs/design/performance.md,
"Events relayed from the worker's read callback").

This writes as uvicorn's HTTP/1.1 server (its httptools protocol, the one the gateway serves with) writes a
chunked body, and only while that server's own `send` would write at once: the response started chunked, not
complete, the client connected and not under flow control. Anything else (another server, another protocol,
a paused client) gets no writer or a refusal, and the body goes through the ASGI `send` instead.

`writes_joined` holds what the server writes for a response over a few of its own `send`s and writes it as
one: a stream's head and its first events, one syscall and one client wake-up for both. `ResponseOpener` does
the same from a worker's read callback, so that a stream's first events reach the client without waiting for
the request's task to be woken, a turn of the event loop (docs/design/performance.md, "A stream opens from the
read callback").
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Awaitable, Coroutine, Iterator
from typing import Any

from starlette.types import Message, Send
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

LINGER_OFF = struct.pack("ii", 1, 0)  # SO_LINGER on with no time: a close resets the connection


class DirectBodyWriter:
    """Writes body chunks of one started, chunked response straight to its transport."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle

    def writable(self) -> bool:
        """The server's `send` would write now, without waiting: connected, not complete, not paused. The
        transport is asked too: uvicorn marks only the connection's latest request disconnected, and after a
        close it learns of the loss a loop turn later."""
        cycle = self._cycle
        return not (cycle.flow.write_paused or cycle.disconnected or cycle.response_complete
                    or cycle.transport.is_closing())

    def write(self, body: bytes) -> None:
        """One chunk, framed as the server frames it; call only right after `writable()` said yes."""
        self._cycle.transport.write(_framed(body))


def _framed(body: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(body), body)


def direct_body_writer(send: Send) -> DirectBodyWriter | None:
    """A writer for the response `send` belongs to, once its start has gone out chunked; None if the server or
    the response is another kind, or the server's internals are not the ones this was written against (the
    ASGI `send` then carries every chunk; tests/unit/test_uvicorn_fast_path.py fails rather than let that pass)."""
    cycle = _cycle_of(send)
    if cycle is None:
        return None
    try:
        usable = (cycle.response_started and cycle.chunked_encoding is True and not cycle.response_complete
                  and isinstance(cycle.flow.write_paused, bool) and isinstance(cycle.disconnected, bool)
                  and callable(cycle.transport.write) and callable(cycle.transport.is_closing))
    except AttributeError:
        return None
    return DirectBodyWriter(cycle) if usable else None


class ResponseOpener:
    """Starts one response from outside its task (a worker's read callback), with its body's first chunk: the
    start goes through the app's own `send` (its middleware stamps the head), driven to its end at once, and the
    head and the chunk leave in one write."""

    __slots__ = ("_cycle", "_send", "_start")

    def __init__(self, cycle: RequestResponseCycle, send: Send, start: Message) -> None:
        self._cycle = cycle
        self._send = send
        self._start = start

    def writable(self) -> bool:
        """Not started yet, and the server's `send` would write now: nothing in it would wait."""
        cycle = self._cycle
        return not (cycle.response_started or cycle.flow.write_paused or cycle.disconnected
                    or cycle.response_complete or cycle.transport.is_closing())

    def open(self, body: bytes) -> DirectBodyWriter:
        """The head and `body` in one write; call only right after `writable()` said yes. The writer it returns
        carries the rest of the body."""
        cycle = self._cycle
        transport = cycle.transport
        held = _HeldWrites(transport)
        cycle.transport = held  # type: ignore[assignment]  # a stand-in: holds writes, passes the rest on
        try:
            _run_at_once(self._send(self._start))
        finally:
            cycle.transport = transport
        if cycle.chunked_encoding is not True:
            raise RuntimeError("the server did not start a chunked body")
        if body:
            held.parts.append(_framed(body))
        held.flush()
        return DirectBodyWriter(cycle)


def response_opener(server_send: Send, app_send: Send, start: Message) -> ResponseOpener | None:
    """An opener for the response `server_send` belongs to, with `start` sent through `app_send`; None if the
    server is another kind, the response has started, or the start could be other than a chunked body."""
    cycle = _cycle_of(server_send)
    if cycle is None or any(name in (b"content-length", b"transfer-encoding") for name, _ in start["headers"]):
        return None
    try:
        usable = (not cycle.response_started and cycle.chunked_encoding is None and cycle.scope["method"] == "POST"
                  and isinstance(cycle.flow.write_paused, bool) and isinstance(cycle.disconnected, bool)
                  and callable(cycle.transport.write) and callable(cycle.transport.is_closing))
    except (AttributeError, KeyError):
        return None
    return ResponseOpener(cycle, app_send, start) if usable else None


def _run_at_once(step: Awaitable[None]) -> None:
    """Run a coroutine that does not wait (the start's `send` while the client is writable) to its end, here."""
    if not isinstance(step, Coroutine):
        raise TypeError(f"not a coroutine: {step!r}")
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise RuntimeError("the response's start would have waited")


class _HeldWrites:
    """Stands in for a cycle's transport while its writes are held: keeps what is written, passes the rest on."""

    __slots__ = ("parts", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def flush(self) -> None:
        if self.parts:
            data = b"".join(self.parts)
            self.parts.clear()
            self.transport.write(data)

    def close(self) -> None:
        self.flush()  # what the server wrote before closing goes out before the close
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


@contextlib.contextmanager
def writes_joined(send: Send) -> Iterator[None]:
    """What the server writes for `send`'s response inside the block leaves in one write at its end: a stream's
    head and its first events, one syscall and one client wake-up for both. The server still frames every byte
    and keeps its own state; only the moment of the write moves. Without uvicorn's httptools cycle behind
    `send`, writes go out as they are made."""
    cycle = _cycle_of(send)
    if cycle is None or not callable(getattr(getattr(cycle, "transport", None), "write", None)):
        yield
        return
    transport = cycle.transport
    held = _HeldWrites(transport)
    cycle.transport = held  # type: ignore[assignment]  # a stand-in: holds writes, passes the rest on
    try:
        yield
    finally:
        cycle.transport = transport
        held.flush()


def abort_connection(send: Send) -> None:
    """Drop the connection `send`'s response goes over, with whatever is still queued for it, in the gateway and
    in the kernel: a reset, where a close would first wait for a reader that has stopped reading."""
    cycle = _cycle_of(send)
    transport = getattr(cycle, "transport", None)
    if transport is None or not callable(getattr(transport, "abort", None)):
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)  # close = reset, queue discarded
    transport.abort()


def _cycle_of(send: Send) -> RequestResponseCycle | None:
    """The uvicorn httptools request cycle whose `send` this is, if it is one."""
    cycle = getattr(send, "__self__", None)
    return cycle if type(cycle) is RequestResponseCycle else None
