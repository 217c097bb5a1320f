"""One client stream: the worker's SSE relayed to the client one event to one, its tokens counted and timed, its
end clean or one final error event, and the response that carries it (`respond`).

`Stream` is the only object a streaming request deals with: forwarding makes it, hands `first_read_sink` to the
worker call, `attach`es the open worker stream and returns `respond(...)`. The response (response.py) drives
`events()` and `settle()`; the uvicorn fast path (uvicorn_fast_path.py) lets it write from the worker
connection's read callback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Sequence

from starlette.types import Scope

from gateway.admission.client_watch import ClientWatch
from gateway.errors import GatewayError, UpstreamFailed
from gateway.observability.record import DISCONNECTED_STATUS, RequestRecord
from gateway.streaming.response import StreamResponse
from gateway.streaming.sent_log import SentLog
from gateway.streaming.usage import UsageFilter
from gateway.streaming.uvicorn_fast_path import DirectBodyWriter, ResponseOpener
from gateway.upstream.calls import OpenStream
from gateway.upstream.client import Sink
from gateway.upstream.sse import Event, EventSplitter, UsageTail, usage_tail

logger = logging.getLogger("specgate.stream")

DONE_EVENT = b"data: [DONE]\n\n"
BODY_END_WAIT_S = 1.0


class Stream:
    """One client stream: `events()` is the response body, `settle()` runs once the response is complete.

    At [DONE] the body ends at once, so the client's response completes (and uvicorn starts the next request
    of that keep-alive connection) without waiting on the worker; `settle()` then takes the worker's chunked
    terminator, so its connection goes back to the pool, closes the worker request and records the request.
    Any other ending (error, disconnect, cancellation) closes and records inside `events()` itself.

    Given a direct writer (`write_directly`), the events that arrive while `events()` waits for the worker are
    counted and written from the worker connection's read callback (`_inline`): no task wake-up, generator step
    or ASGI send per event. What that callback cannot finish (the stream's end, an error event, an event split
    across reads, a client under flow control) it refuses, and `events()` takes it, in order. With an opener
    (made by `respond`, used by `first_read_sink`), the stream's first events and the response's head go out
    from that callback too, so the first token reaches the client without waiting for the task's wake-up, a turn
    of the event loop (docs/design/performance.md, "Events relayed from the worker's read callback" and "A stream
    opens from the read callback").
    """

    __slots__ = ("_capture", "_clean_end", "_clock", "_ended", "_on_finish", "_opened", "_opened_inline", "_opener",
                 "_record", "_settled", "_stream", "_usage", "_writer", "final")

    _stream: OpenStream

    def __init__(self, stream: OpenStream | None, record: RequestRecord, usage: UsageFilter,
                 clock: Callable[[], float], on_finish: Callable[[RequestRecord], None],
                 capture: SentLog | None = None) -> None:
        if stream is not None:
            self._stream = stream
        # Given a log, what the client gets is kept in it too (to compare answers, to continue a failed stream).
        self._capture = capture
        self._record = record
        self._usage = usage
        self._clock = clock
        self._on_finish = on_finish
        self._clean_end = False
        self._ended = False
        self._settled = False
        self._writer: DirectBodyWriter | None = None
        self._opener: ResponseOpener | None = None
        self._opened_inline = False
        # The first events' take, once `opening()` has handed their bytes to the response.
        self._opened: tuple[bytes, list[int], bool, bool] | None = None
        # True while `events()` holds its last chunk out ([DONE] or an error event): the response sends it with
        # the body's end in one write.
        self.final = False

    def attach(self, stream: OpenStream) -> None:
        """The worker stream this relays, once it is open (a stream made before it is `Stream(None, ...)`)."""
        self._stream = stream

    def respond(self, watch: ClientWatch, scope: Scope, ping_s: float, send_timeout_s: float,
                headers: dict[str, str] | None = None) -> StreamResponse:
        """The client's response, made before the worker stream opens so that its first events can open it from
        the worker's read callback (`first_read_sink`); `headers` are added to its head."""
        response = StreamResponse(self, watch=watch, ping=ping_s, sep="\n", send_timeout=send_timeout_s,
                                  headers=headers)
        self._opener = response.inline_opener(scope)
        return response

    @property
    def first_read_sink(self) -> Sink | None:
        """A sink for the worker stream's first network read (`Upstream.open_stream`): if the client is writable
        and the read holds whole events, none of them [DONE] or an error, it counts them and writes the response's
        head and them at once, from the read callback. Refused, the stream opens from the request's task; nothing
        of the read has been counted then. None off the uvicorn fast path."""
        return self._open_from_callback if self._opener is not None else None

    def _open_from_callback(self, data: bytes) -> bool:
        opener = self._opener
        if opener is None or self._opened_inline or not opener.writable():
            return False
        splitter = EventSplitter()
        events = [Event.parse(raw) for raw in splitter.feed(data)]
        if not events or splitter.pending:
            return False
        for event in events:
            if event.is_done or event.is_error:
                return False
        out, content_tokens, _, _ = self._take(events, self._clock())
        self._writer = opener.open(out)
        self._opened_inline = True
        self._opener = None
        self._delivered(content_tokens)
        return True

    def write_directly(self, writer: DirectBodyWriter) -> None:
        """From now on, events that arrive while the stream waits go to `writer` from the worker's read callback
        (uvicorn_fast_path.py); the stream's end, errors and a paused client still come through `events()`."""
        self._writer = writer

    def opening(self) -> bytes | None:
        """The bytes of the events the stream opened on, for the response to write with its head (they are here
        already: no wait). `events()` then starts after them; `final` says whether they end the body. None: the
        head and those events went out from the worker's read callback (`first_read_sink`), and events that
        arrive next go out from there too."""
        if self._opened_inline:
            self._opened = (b"", [], False, False)
            return None
        self._opened = opened = self._take(self._stream.first_events, self._stream.first_event_at)
        out, _, failed, saw_done = opened
        self.final = failed or saw_done
        return out

    async def events(self) -> AsyncGenerator[bytes, None]:
        """The client's stream. Cancelled on client disconnect; the finally closes the worker request."""
        stream, record, clock = self._stream, self._record, self._clock
        finished = False
        record.upstream_sent_at = stream.sent_at
        try:
            pending = stream.first_events
            arrived_at = stream.first_event_at
            opened = self._opened
            while True:
                if opened is not None:  # written by the response before it asked for more
                    out, content_tokens, failed, saw_done = opened
                    opened = None
                else:
                    out, content_tokens, failed, saw_done = self._take(pending, arrived_at)
                    if out:
                        self.final = failed or saw_done
                        yield out
                if out:
                    self._delivered(content_tokens)
                if failed:
                    record.status = "502"
                    finished = True
                    return
                if saw_done:
                    finished = self._clean_end = True
                    record.finished_at = clock()
                    return
                chunk = await stream.next_chunk(self._inline if self._writer is not None else None)
                if not chunk:
                    raise UpstreamFailed("worker closed the stream before [DONE]")
                arrived_at = clock()
                pending = [Event.parse(raw) for raw in stream.splitter.feed(chunk)]
        except GatewayError as exc:
            record.status = exc.metric_status
            finished = self.final = True
            yield exc.sse_event()
        except Exception:
            # A fault of the gateway's own after bytes went out: the client still gets a well-formed ending.
            logger.exception("request %s: the relay failed", record.request_id)
            record.status = "500"
            finished = self.final = True
            yield GatewayError("internal gateway error").sse_event()
        except (asyncio.CancelledError, GeneratorExit):
            record.disconnected = True
            record.status = DISCONNECTED_STATUS
            raise
        finally:
            self._ended = True
            if not finished and not record.disconnected:
                record.disconnected = True
                record.status = DISCONNECTED_STATUS
            if not self._clean_end:
                await self._close()

    def _take(self, events: Sequence[Event | UsageTail], arrived_at: float) -> tuple[bytes, list[int], bool, bool]:
        """Count one read's events and frame what the client gets of them: (bytes, tokens of each counted event,
        an error event ended it, [DONE] is among them). Events that came in one read leave in one write: none
        waits for another, and under load the per-write cost is paid once per read instead of once per event."""
        record, usage = self._record, self._usage
        out = b""
        content_tokens: list[int] = []
        failed = saw_done = False
        for item in events:
            if isinstance(item, Event):
                event = item
            else:
                taken = usage.take_tail(item, record)
                if taken is not None:
                    if record.upstream_first_token_at is None:
                        record.upstream_first_token_at = arrived_at
                    out = out + taken[0] if out else taken[0]
                    content_tokens.append(taken[1])
                    continue
                event = Event.parse(item[0])
            payload = event.payload
            tokens = usage.tokens_in(payload, record, event.has_content) if payload else 0
            counted = event.has_content or tokens
            if counted and record.upstream_first_token_at is None:
                record.upstream_first_token_at = arrived_at
            piece = usage.client_bytes(event)
            if piece is None:
                continue
            out = out + piece if out else piece
            if counted:
                content_tokens.append(tokens)
            if event.is_error:
                failed = True
                break
            if event.is_done:
                saw_done = True
        if self._capture is not None and out:
            self._capture.append(out)
        return out, content_tokens, failed, saw_done

    def _inline(self, data: bytes) -> bool:
        """Relay one network read from the worker's read callback, if nothing in it needs the stream's task:
        the client is writable, no event is split across reads, none is [DONE] or an error."""
        writer, splitter = self._writer, self._stream.splitter
        if writer is None or splitter.pending or not writer.writable():
            return False
        arrived_at = self._clock()
        events: list[Event | UsageTail] = []
        for raw in splitter.feed(data):
            tail = usage_tail(raw)
            if tail is not None:
                events.append(tail)
                continue
            event = Event.parse(raw)
            if event.is_done or event.is_error:
                splitter.clear()  # it was empty before this read, which `events()` now takes whole
                return False
            events.append(event)
        out, content_tokens, _, _ = self._take(events, arrived_at)
        if out:
            writer.write(out)
            self._delivered(content_tokens)
        self._stream.guard.renew()
        return True

    def _delivered(self, content_tokens: list[int]) -> None:
        """The counted events of one write have reached the client's socket, all at this moment."""
        now = self._clock()
        record = self._record
        for tokens in content_tokens:
            record.on_content(now, tokens)

    async def settle(self) -> None:
        """After the response: take the terminator (clean end only), close the worker request, record it."""
        if self._settled:
            return
        if self._clean_end:
            await _read_to_end(self._stream)
        elif not self._ended:
            # The body never ran: the client left (or a write failed) before the stream's first event went out.
            self._record.disconnected = True
            self._record.status = DISCONNECTED_STATUS
        await self._close()

    async def _close(self) -> None:
        if self._settled:
            return
        self._settled = True
        self._writer = None  # it holds the server's request cycle
        record = self._record
        if record.finished_at is None:
            record.finished_at = self._clock()
        try:
            await self._stream.aclose()
        finally:
            self._on_finish(record)


async def _read_to_end(stream: OpenStream) -> None:
    """Take the chunked terminator that follows [DONE], so the connection goes back to the pool rather than
    being closed (a new TCP connection per request otherwise)."""
    try:
        async with asyncio.timeout(BODY_END_WAIT_S):
            while await stream.reply.read():
                pass
    except (TimeoutError, GatewayError):
        pass
