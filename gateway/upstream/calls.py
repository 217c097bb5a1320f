"""Opens a worker stream or makes a whole call, within timeouts, every failure one of the gateway's errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.admission.deadlines import FirstTokenBudget, WaitGuard
from gateway.errors import (
    DeadlinePassed,
    GatewayError,
    NoWorkerAvailable,
    ShuttingDown,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    WaitTooLong,
    WorkersBusy,
)
from gateway.settings import GatewaySettings
from gateway.upstream.client import Sink, WorkerClient, WorkerReply
from gateway.upstream.sse import Event, EventSplitter

MAX_ERROR_BODY = 64 * 1024
MAX_RETRY_AFTER_S = 3600


@dataclass(eq=False)
class OpenStream:
    """A worker stream whose status was 200 and whose first event has arrived (and, when it was taken from the
    read callback, has gone to the client already: `first_events` is empty then)."""

    reply: WorkerReply
    splitter: EventSplitter
    first_events: list[Event]
    sent_at: float
    first_event_at: float
    closed: bool = field(default=False)
    # Bounds each read by the idle timeout and, once the drainer sets one, by the shutdown deadline.
    guard: WaitGuard = field(default_factory=WaitGuard)

    async def next_chunk(self, inline: Sink | None = None) -> bytes:
        """The next network chunk, b"" at the end of the body; every failure as one of the gateway's errors.
        With `inline`, bytes arriving meanwhile are offered to it first (`WorkerReply.read_inline`), and the
        ones it takes count as the stream's activity for the idle bound."""
        guard = self.guard
        read_inline = self.reply.read_inline
        try:
            guard.begin()
            try:
                if inline is not None and read_inline is not None:
                    return await read_inline(inline)
                return await self.reply.read()
            except asyncio.CancelledError:
                guard.raise_if_cut()
                raise
            finally:
                guard.end()
        except DeadlinePassed:
            raise ShuttingDown() from None
        except WaitTooLong:
            raise UpstreamTimeout(f"worker sent nothing for {guard.limit_s:g}s") from None

    def end_by(self, deadline: float) -> None:
        self.guard.end_by(deadline)

    async def aclose(self) -> None:
        """Close the worker connection; shielded so a cancelled caller still makes vLLM abort."""
        if self.closed:
            return
        self.closed = True
        self.guard.close()
        await self.reply.aclose()


class Upstream:
    """Sends one request to one worker through a WorkerClient and maps every failure onto the gateway's errors."""

    def __init__(self, client: WorkerClient, settings: GatewaySettings, clock: Callable[[], float]) -> None:
        self._client = client
        self._settings = settings
        self._clock = clock
        self._first_token = FirstTokenBudget(
            settings.first_token_base_s, settings.first_token_per_prompt_kib_s, settings.first_token_per_waiting_s,
            settings.first_token_timeout_s,
        )

    async def open_stream(self, worker_url: str, path: str, body: bytes, request_id: str,
                          opening: Sink | None = None, waiting: float = 0.0) -> OpenStream:
        """Send the request and wait, within the first-token timeout, for a 200 and the first event. With
        `opening`, the first network read of the body is offered to it from the worker's read callback; taken, it
        has gone to the client (`Stream.first_read_sink`), the stream is open with no `first_events`, and
        no other worker can be tried for this request any more."""
        sent_at = self._clock()
        limit = self._first_token.limit_s(len(body), waiting)
        reply: WorkerReply | None = None
        try:
            async with asyncio.timeout(limit) as deadline:
                reply = await self._client.post(worker_url, path, body, request_id, True)
                if reply.status != 200:
                    raise await _status_error(reply)
                read = reply.read
                splitter = EventSplitter()
                events: list[Event] = []
                first_read = reply.read_first_inline if opening is not None else None
                if first_read is not None and opening is not None:
                    chunk: bytes | None = await first_read(_before(deadline, opening))
                else:
                    chunk = await read()
                while chunk is not None:  # None: the first read went to the client from the callback
                    if not chunk:
                        raise StopAsyncIteration
                    events = [Event.parse(raw) for raw in splitter.feed(chunk)]
                    if events:
                        break
                    chunk = await read()
            guard = WaitGuard(self._settings.stream_idle_timeout_s)
            return OpenStream(reply, splitter, events, sent_at, self._clock(), guard=guard)
        except BaseException as exc:
            if reply is not None:
                await reply.aclose()
            if isinstance(exc, StopAsyncIteration):
                raise UpstreamFailed("worker closed the stream before its first event") from None
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(f"no first event from the worker within {limit:g}s") from None
            raise

    async def complete(self, worker_url: str, path: str, body: bytes, request_id: str) -> bytes:
        """A non-streaming call: the whole body of a 200 answer. The clients bound each wait for bytes; the
        whole call, every attempt included, is bounded by the caller (`gateway.api.forwarding`)."""
        reply = await self._client.post(worker_url, path, body, request_id, False)
        try:
            if reply.status != 200:
                raise await _status_error(reply)
            return await reply.body()
        finally:
            await reply.aclose()


def _before(deadline: asyncio.Timeout, opening: Sink) -> Sink:
    """`opening`, refused once the first-token deadline has passed (the timeout's cancel may already be on its way
    to the task, which would then retry elsewhere what a client has begun to receive), and clearing it once taken
    (a long stream is bounded by its idle timeout from then on)."""

    def open_in_time(data: bytes) -> bool:
        if deadline.expired() or not opening(data):
            return False
        deadline.reschedule(None)
        return True

    return open_in_time


async def _status_error(reply: WorkerReply) -> GatewayError:
    body = await reply.body(MAX_ERROR_BODY)
    status = reply.status
    if 400 <= status < 500 and status not in (408, 429):
        return UpstreamRejected(status, body)
    detail = body.decode("utf-8", "replace")[:300]
    if status == 429:
        return WorkersBusy(f"worker is overloaded: {detail}", retry_after_s=_retry_after(reply.headers))
    if status == 503:
        return NoWorkerAvailable(f"worker is busy or draining ({status}): {detail}", retry_after_s=1)
    if status == 408:
        return UpstreamTimeout(f"worker timed out: {detail}")
    return UpstreamFailed(f"worker answered {status}: {detail}")


def _retry_after(headers: Mapping[str, str]) -> int:
    """A worker's Retry-After in whole seconds (at least 1); 1 when it sent none or a date."""
    value = headers.get("retry-after", "")
    return max(1, min(int(value), MAX_RETRY_AFTER_S)) if value.strip().isdigit() else 1
