"""Mid-stream failover, the stream side: a worker stream that, when its worker fails after the first byte (reset,
killed, closed early, idle past the timeout), goes on from another worker, so the client's one stream survives.

Contract: `ResumableStream` is the `OpenStream` the relay reads (streaming/stream.py). Until a failure its reads
are the worker's, untouched, fast path included. On a failure it asks `resume` (given the failure) for a
continuation: a new worker stream and the rewrite that splices its events in (streaming/resume.py); from then on
its reads are that stream's events, rewritten and framed whole, and the partial event the failed worker left is
dropped (the client never got it). Without a continuation the failure goes on to the relay as it would have.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.errors import GatewayError, UpstreamFailed, UpstreamTimeout
from gateway.streaming.resume import Rewrite
from gateway.upstream.calls import OpenStream
from gateway.upstream.client import Sink
from gateway.upstream.sse import SEPARATOR, Event, EventSplitter

Continuation = tuple[OpenStream, Rewrite]
Resume = Callable[[GatewayError], Awaitable[Continuation | None]]


class ResumableStream(OpenStream):
    def __init__(self, opened: OpenStream, resume: Resume) -> None:
        super().__init__(opened.reply, opened.splitter, opened.first_events, opened.sent_at, opened.first_event_at,
                         guard=opened.guard)
        self._resume = resume
        self._rewrite: Rewrite | None = None
        self._source = opened.splitter  # splits the worker's bytes; `splitter` then gets whole, rewritten events
        self._deadline: float | None = None

    @property
    def resumed(self) -> bool:
        return self._rewrite is not None

    async def next_chunk(self, inline: Sink | None = None) -> bytes:
        while True:
            try:
                # Once resumed, every byte comes back here to be rewritten: none goes out from the read callback.
                chunk = await super().next_chunk(inline if self._rewrite is None else None)
                failure: GatewayError = UpstreamFailed("worker closed the stream before [DONE]")
            except (UpstreamFailed, UpstreamTimeout) as exc:
                chunk, failure = b"", exc
            if chunk:
                if self._rewrite is None:
                    return chunk
                framed = self._framed([Event.parse(raw) for raw in self._source.feed(chunk)])
                if framed:
                    return framed
                continue
            continuation = await self._resume(failure)
            if continuation is None:
                raise failure
            await self.reply.aclose()  # the failed worker's connection (vLLM aborts the request if it lives)
            framed = self._switch(*continuation)
            if framed:
                return framed

    def _switch(self, stream: OpenStream, rewrite: Rewrite) -> bytes:
        """Read from `stream` from now on; its first events, rewritten and framed."""
        self.reply, self.guard, self._source, self._rewrite = stream.reply, stream.guard, stream.splitter, rewrite
        self.splitter = EventSplitter()  # what the failed worker left half-sent is not the client's
        if self._deadline is not None:
            self.guard.end_by(self._deadline)
        return self._framed(stream.first_events)

    def _framed(self, events: list[Event]) -> bytes:
        assert self._rewrite is not None
        out = [rewritten.raw + SEPARATOR for event in events if (rewritten := self._rewrite(event)) is not None]
        return b"".join(out)

    def end_by(self, deadline: float) -> None:
        self._deadline = deadline
        super().end_by(deadline)
