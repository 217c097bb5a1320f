"""The direct writer without a server: which sends get one, when it may write, the stream's hand-off to the task."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.streaming.uvicorn_fast_path import DirectBodyWriter
from tests.unit.fakes import DONE, MODEL, vllm_stream


def test_no_direct_writer_for_other_servers_or_before_the_start() -> None:
    from gateway.streaming.uvicorn_fast_path import direct_body_writer

    async def plain_send(message: Any) -> None:
        pass

    sends: list[Callable[..., Any]] = [plain_send, print]
    assert all(direct_body_writer(send) is None for send in sends)


class ScriptedWriter:
    """A direct writer whose client is writable or not as scripted; records what it was given."""

    def __init__(self, writable: list[bool], client: list[bytes]) -> None:
        self._writable = writable
        self.client = client

    def writable(self) -> bool:
        return self._writable.pop(0)

    def write(self, body: bytes) -> None:
        self.client.append(body)


def test_reads_the_client_cannot_take_now_and_the_stream_end_come_through_the_task_in_order() -> None:
    import asyncio
    from typing import cast

    from gateway.observability.record import RequestRecord
    from gateway.streaming.stream import Stream
    from gateway.streaming.usage import UsageFilter
    from gateway.upstream.calls import OpenStream
    from gateway.upstream.client import Sink, WorkerReply
    from gateway.upstream.sse import Event, EventSplitter

    role, first, second, third, fourth, usage = vllm_stream([1, 1, 1, 1])[:6]
    # What the worker connection's callback gets, one network read each; the third event is split in two.
    reads = [second, third[:20], third[20:], fourth, usage + DONE]
    offered: list[bytes] = []

    async def read() -> bytes:
        return reads.pop(0) if reads else b""

    async def read_inline(sink: Sink) -> bytes:
        while reads:
            data = reads.pop(0)
            offered.append(data)
            if not sink(data):
                return data
        return b""

    async def close() -> None:
        return None

    client: list[bytes] = []
    # Asked for each read that starts with no partial event: second, third's first half (not writable), fourth,
    # and the end (refused for its [DONE] once parsed).
    writer = ScriptedWriter([True, False, True, True], client)
    splitter = EventSplitter()
    reply = WorkerReply(200, {}, read, close, read_inline)
    opened = OpenStream(reply, splitter, [Event.parse(raw) for raw in splitter.feed(role + first)], 0.0, 0.1)
    record = RequestRecord(request_id="r", model=MODEL, endpoint="chat", stream=True, received_at=0.0)
    relay = Stream(opened, record, UsageFilter(True, True), time.perf_counter, lambda done: None)
    relay.write_directly(cast(DirectBodyWriter, writer))

    async def run() -> None:
        async for out in relay.events():
            client.append(out)
        await relay.settle()

    asyncio.run(run())
    assert b"".join(client) == role + first + second + third + fourth + usage + DONE
    # The task took the half the client could not take, then the other half (an event split across reads is
    # the task's), and wrote the whole event; the callback wrote second and fourth.
    assert client == [role + first, second, third, fourth, usage + DONE]
    assert offered == [second, third[:20], third[20:], fourth, usage + DONE]
    assert record.output_tokens == 4 and record.status == "200"
    assert [tokens for _, tokens in record.chunk_gaps] == [1, 1, 1]


def test_a_closing_transport_or_a_paused_client_is_not_writable() -> None:
    from types import SimpleNamespace
    from typing import cast

    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    transport = SimpleNamespace(closing=False, is_closing=lambda: transport.closing)
    cycle = SimpleNamespace(flow=SimpleNamespace(write_paused=False), disconnected=False, response_complete=False,
                            transport=transport)
    writer = DirectBodyWriter(cast(RequestResponseCycle, cycle))
    assert writer.writable()
    # uvicorn marks only a connection's latest request disconnected, and learns of a close a loop turn later.
    transport.closing = True
    assert not writer.writable()
    transport.closing = False
    cycle.flow.write_paused = True
    assert not writer.writable()
