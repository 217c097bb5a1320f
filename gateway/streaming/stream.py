"""Relay stage: forward worker SSE events one to one, count tokens, stamp times, end cleanly or with an error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from gateway.errors import GatewayError, UpstreamFailed
from gateway.observability.metrics import RequestRecord, token_count
from gateway.streaming.uvicorn_fast_path import DirectBodyWriter, ResponseOpener
from gateway.upstream.calls import OpenStream
from gateway.upstream.client import Sink
from gateway.upstream.sse import SEPARATOR, Event, EventSplitter, UsageTail, encode_data, usage_tail

logger = logging.getLogger("specgate.relay")

DONE_EVENT = b"data: [DONE]\n\n"
DISCONNECTED_STATUS = "499"
BODY_END_WAIT_S = 1.0


class UsageFilter:
    """Reads token counts from each event and shows the client only the usage it asked for."""

    __slots__ = ("_continuous", "_include", "_tokens_seen", "exact")

    def __init__(self, include_usage: bool, continuous_usage: bool) -> None:
        self._include = include_usage
        self._continuous = include_usage and continuous_usage
        self._tokens_seen = 0
        self.exact = False

    def tokens_in(self, payload: dict[str, Any], record: RequestRecord, has_content: bool) -> int:
        """Output tokens this event carries, from the worker's cumulative usage when it sends it."""
        usage = payload.get("usage")
        if isinstance(usage, dict):
            completion = token_count(usage.get("completion_tokens"))
            return self._counted(usage, completion, record, bool(payload.get("choices")))
        if has_content and not self.exact:
            # A worker without per-chunk usage: one token per content event is the best estimate.
            self._tokens_seen += 1
            record.output_tokens = max(record.output_tokens, self._tokens_seen)
            return 1
        return 0

    def take_tail(self, tail: UsageTail, record: RequestRecord) -> tuple[bytes, int] | None:
        """A content chunk read from its usage (`upstream.sse.usage_tail`): the bytes the client gets and the new
        tokens it carries; None, with nothing counted, if it carries no new token (the whole parse then takes it,
        as it takes every event that is not plainly one more token or more)."""
        raw, at, usage = tail
        completion = token_count(usage.get("completion_tokens"))
        if completion <= self._tokens_seen:
            return None
        tokens = self._counted(usage, completion, record, True)
        # Without its usage member: the bytes up to it, and the top-level object's closing brace.
        return (raw + SEPARATOR if self._continuous else raw[:at] + b"}" + SEPARATOR), tokens

    def _counted(self, usage: dict[str, Any], completion: int, record: RequestRecord, has_choices: bool) -> int:
        """Take an event's cumulative usage into the record; the new output tokens it carries (none for the
        usage-only chunk, which has no choices)."""
        record.prompt_tokens = token_count(usage.get("prompt_tokens")) or record.prompt_tokens
        record.output_tokens = completion
        if not has_choices:
            return 0
        self.exact = True
        delta = completion - self._tokens_seen
        self._tokens_seen = completion
        return max(delta, 0)

    def client_bytes(self, event: Event) -> bytes | None:
        """The bytes to send for this event, or None to hold it back (usage the client did not ask for)."""
        payload = event.payload
        if payload is None or "usage" not in payload:
            return event.raw + SEPARATOR
        if not payload.get("choices"):
            return event.raw + SEPARATOR if self._include else None
        if self._continuous:
            return event.raw + SEPARATOR
        trimmed = dict(payload)
        del trimmed["usage"]
        return encode_data(trimmed)


class Relay:
    """One client stream: `events()` is the response body, `settle()` runs once the response is complete.

    At [DONE] the body ends at once, so the client's response completes (and uvicorn starts the next request
    of that keep-alive connection) without waiting on the worker; `settle()` then takes the worker's chunked
    terminator, so its connection goes back to the pool, closes the worker request and records the request.
    Any other ending (error, disconnect, cancellation) closes and records inside `events()` itself.

    Given a direct writer (`write_directly`), the events that arrive while `events()` waits for the worker are
    counted and written from the worker connection's read callback (`_inline`): no task wake-up, generator step
    or ASGI send per event. What that callback cannot finish (the stream's end, an error event, an event split
    across reads, a client under flow control) it refuses, and `events()` takes it as before. With an opener
    (`open_inline`), the stream's first events and the response's head go out from that callback too, so the
    first token reaches the client without the task's wake-up on its way: a turn of the event loop, which under
    load is most of what a gateway adds to the time to first token.
    """

    __slots__ = ("_clean_end", "_clock", "_ended", "_on_finish", "_opened", "_opened_inline", "_opener", "_record",
                 "_settled", "_stream", "_usage", "_writer", "final")

    _stream: OpenStream

    def __init__(self, stream: OpenStream | None, record: RequestRecord, usage: UsageFilter,
                 clock: Callable[[], float], on_finish: Callable[[RequestRecord], None]) -> None:
        if stream is not None:
            self._stream = stream
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
        """The worker stream this relays, once it is open (a relay made before it is `Relay(None, ...)`)."""
        self._stream = stream

    def open_inline(self, opener: ResponseOpener) -> Sink:
        """A sink for the worker stream's first network read (`Upstream.open_stream`): if the client is writable
        and the read holds whole events, none of them [DONE] or an error, it counts them and `opener` writes the
        response's head and them at once, from the read callback. Refused, the stream opens as before, from the
        request's task; nothing of the read has been counted then."""
        self._opener = opener
        return self._open_from_callback

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
        head and those events went out from the worker's read callback (`open_inline`), and events that arrive
        next go out from there too."""
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
