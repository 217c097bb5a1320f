"""Fake engine plumbing: raw ASGI helpers for bodies, responses, deadline sleeps and connection resets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Lateness always tolerated before a stream's schedule slips: about two timer ticks.
_MIN_SLACK_S = 0.002


async def sleep_until(deadline: float, gap: float) -> float:
    """Sleep to an absolute deadline and return the next step's base.

    Timers are millisecond-grained, so deadlines stay absolute and the mean gap stays exact. Late by more than
    a whole step means the engine is overloaded: the schedule then slips, as a slow engine step would, rather
    than bursting to catch up.
    """
    delay = deadline - time.perf_counter()
    # Always yield, so a zero-gap stream cannot starve the other streams.
    await asyncio.sleep(delay if delay > 0 else 0)
    now = time.perf_counter()
    return now if now - deadline > max(gap, _MIN_SLACK_S) else deadline


def reset_connection(send: Send) -> bool:
    """Reset the TCP connection (RST, as from a crashed worker) when the server is uvicorn; otherwise just unwind.

    ASGI has no way to abort a connection, so this reaches for uvicorn's transport behind `send`.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    return True


async def read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
