"""What the relay's task wake-up costs per event, against handing each read to a callback (a measurement aid).

    taskset -c 0 python -m loadtest.wake_cost --events 200000

The relay (gateway/relay.py) waits for each worker read in its request's task: the worker connection's
`data_received` sets a future, the loop steps the task, and the read climbs back up the response's send loop,
the relay's generator and the stream's read. A push design would skip all of that by calling the relay from
`data_received` itself. Both are timed here in one process on uvloop, without sockets, with the same await
chain depth as the gateway's and a body send that completes at once (as uvicorn's does when the client is not
slow); `loop only` is the cost of one loop turn per event, which both designs pay.

This loop put the difference at ~2 µs per event. The gateway now relays from `data_received`
(gateway/directwrite.py), and in the gateway, under load, it saved ~10 µs of user CPU per event (A/B in
loadtest/results/profile.md, "Events relayed from the worker's read callback"): the loop here runs warm, with
no guard around the waits, no response-side checks and no real socket, so it understates what a wake-up
costs among hundreds of streams.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import uvloop

CHUNK = b"data: " + b"x" * 200 + b"\n\n"


class Connection:
    """A worker connection's read side: a future per wait, or a consumer called with each read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self._buffer: list[bytes] = []
        self.consumer: Callable[[bytes], None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.consumer is not None:
            self.consumer(data)
            return
        self._buffer.append(data)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read(self) -> bytes:
        if not self._buffer:
            await self._wait()
        chunks, self._buffer = self._buffer, []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def next_chunk(connection: Connection) -> bytes:
    return await connection.read()


async def relay_events(connection: Connection) -> AsyncIterator[bytes]:
    while True:
        yield await next_chunk(connection)


async def body_send(message: dict[str, Any]) -> None:
    """Stands for the server's send when the client keeps up: it returns without suspending."""


def drive(producer: Callable[[], bool], loop: asyncio.AbstractEventLoop) -> None:
    """One produced read per loop turn, as reads arrive from the network."""
    if producer():
        loop.call_soon(drive, producer, loop)


async def pulled(events: int) -> float:
    loop = asyncio.get_running_loop()
    connection, sent, done = Connection(loop), 0, loop.create_future()

    async def send_loop() -> None:
        nonlocal sent
        async for chunk in relay_events(connection):
            await body_send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += 1
            if sent == events:
                done.set_result(None)
                return

    def produce() -> bool:
        connection.data_received(CHUNK)
        return not done.done()

    task = loop.create_task(send_loop())
    started = time.process_time()
    drive(produce, loop)
    await done
    await task
    return time.process_time() - started


async def pushed(events: int) -> float:
    loop = asyncio.get_running_loop()
    connection, sent, done = Connection(loop), 0, loop.create_future()

    def consume(chunk: bytes) -> None:
        nonlocal sent
        step = body_send({"type": "http.response.body", "body": chunk, "more_body": True})
        try:  # noqa: SIM105 (contextlib.suppress would add its own cost to the timed path)
            step.send(None)
        except StopIteration:
            pass
        sent += 1
        if sent == events:
            done.set_result(None)

    def produce() -> bool:
        connection.data_received(CHUNK)
        return not done.done()

    connection.consumer = consume
    started = time.process_time()
    drive(produce, loop)
    await done
    return time.process_time() - started


async def loop_only(events: int) -> float:
    loop = asyncio.get_running_loop()
    turns, done = 0, loop.create_future()

    def produce() -> bool:
        nonlocal turns
        turns += 1
        if turns == events:
            done.set_result(None)
        return not done.done()

    started = time.process_time()
    drive(produce, loop)
    await done
    return time.process_time() - started


async def measure(events: int, repeats: int) -> dict[str, list[float]]:
    designs: dict[str, Callable[[int], Awaitable[float]]] = {
        "loop only": loop_only, "task wake-up (the relay now)": pulled, "callback (push)": pushed,
    }
    results: dict[str, list[float]] = {name: [] for name in designs}
    for _ in range(repeats):
        for name, run in designs.items():
            results[name].append(await run(events) / events * 1e6)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    results = uvloop.run(measure(args.events, args.repeats))
    print("| design | µs per event (CPU), each repeat |\n|---|---|")
    for name, costs in results.items():
        print(f"| {name} | {' / '.join(f'{cost:.2f}' for cost in costs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
