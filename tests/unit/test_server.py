"""The serving process keeps slow log writes off the event loop and lets bursts of connections in under load."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest

from gateway.server import logging_off_the_loop


class StuckHandler(logging.Handler):
    """A handler whose writes block until released, like stderr into a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.unblock = threading.Event()
        self.written: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.unblock.wait(10)
        self.written.append(record.getMessage())


@pytest.fixture
def stuck_root() -> Iterator[StuckHandler]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = StuckHandler()
    root.handlers, root.level = [handler], logging.INFO
    try:
        yield handler
    finally:
        handler.unblock.set()
        root.handlers, root.level = saved_handlers, saved_level


def test_a_blocked_log_write_does_not_block_the_caller_and_still_arrives(stuck_root: StuckHandler) -> None:
    before = logging.getLogger().handlers[:]
    with logging_off_the_loop():
        assert logging.getLogger().handlers != before
        started = time.perf_counter()
        for index in range(100):
            logging.getLogger("tests.serve").info("request %d", index)
        took = time.perf_counter() - started
        assert took < 1.0, f"logging waited on the stuck handler ({took:.2f}s)"
        assert stuck_root.written == []
        stuck_root.unblock.set()
    assert stuck_root.written == [f"request {index}" for index in range(100)]
    assert logging.getLogger().handlers == before, "the original handlers are back"


def _turns_to_accept(handle_count: int, clients: int = 32) -> int:
    """Event-loop turns (each kept busy for 2 ms) until `clients` connections queued in the kernel are in."""
    import asyncio
    import socket

    import uvicorn
    import uvloop

    from gateway.server import listening_handles

    handles = listening_handles(uvicorn.Config(app="unused:app", host="127.0.0.1", port=0), handle_count)
    handles[0].listen(clients)
    waiting = [socket.create_connection(("127.0.0.1", handles[0].getsockname()[1])) for _ in range(clients)]

    async def serve_the_burst() -> int:
        loop = asyncio.get_running_loop()
        accepted: list[asyncio.BaseTransport] = []
        all_in = asyncio.Event()
        turns = 0

        class Counting(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.append(transport)
                if len(accepted) == clients:
                    all_in.set()

        def busy_turn() -> None:  # the loop relaying hundreds of streams: every turn takes a while
            nonlocal turns
            turns += 1
            time.sleep(0.002)
            if not all_in.is_set():
                loop.call_soon(busy_turn)

        servers = [await loop.create_server(Counting, sock=handle) for handle in handles]
        loop.call_soon(busy_turn)
        async with asyncio.timeout(30):
            await all_in.wait()
        for server in servers:
            server.close()
        for transport in accepted:
            transport.close()
        return turns

    try:
        return uvloop.run(serve_the_burst())
    finally:
        for client in waiting:
            client.close()


def test_a_busy_loop_lets_a_burst_of_new_connections_in_within_a_few_turns() -> None:
    from gateway.server import ACCEPT_HANDLES

    # One handle: libuv takes one connection per turn, so the burst needs a turn per connection.
    assert _turns_to_accept(1) >= 32
    assert _turns_to_accept(ACCEPT_HANDLES) <= 6
