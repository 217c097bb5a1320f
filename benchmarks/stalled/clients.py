"""The clients: raw TCP streams that read everything (live) or nothing at all (stalled), and normal streamed
requests read to their end (the warm-up, and the check that the gateway still serves afterwards)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, cast

import aiohttp
import orjson


def request_bytes(port: int, max_tokens: int, content: str) -> bytes:
    body = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": content}], "stream": True,
                         "max_tokens": max_tokens})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class ClientStream(asyncio.Protocol):
    """One live client connection: reads (and counts) everything the gateway sends."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.events = 0
        self._newline = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        # SSE events end with a blank line; one may straddle two reads.
        self.events += data.count(b"\n\n") + (self._newline and data[:1] == b"\n")
        self._newline = data[-1:] == b"\n"

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class StalledClient:
    """One stalled client: a bare socket that sent its request and is never read (no transport, no reader)."""

    received = 0
    lost = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def close(self) -> None:
        self.sock.close()  # unread data in its receive queue: the kernel resets the connection


Client = ClientStream | StalledClient


async def open_stream(port: int, payload: bytes, stalled: bool, rcvbuf: int) -> tuple[Client, int]:
    """Connect (SO_RCVBUF set before connecting, so the window is small from the start), send the request."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        local_port = int(sock.getsockname()[1])
        if stalled:
            await loop.sock_sendall(sock, payload)
            return StalledClient(sock), local_port
        _, stream = await loop.create_connection(ClientStream, sock=sock)
    except BaseException:
        sock.close()
        raise
    assert stream.transport is not None
    stream.transport.write(payload)
    return stream, local_port


async def open_streams(port: int, count: int, *, stalled: bool, rcvbuf: int, max_tokens: int,
                       parallel: int = 50) -> dict[int, Client]:
    """`count` streams, `parallel` connecting at a time; keyed by their local port (the gateway's remote port)."""
    payload = request_bytes(port, max_tokens, "stall" if stalled else "read")
    gate = asyncio.Semaphore(parallel)

    async def one() -> tuple[Client, int]:
        async with gate:
            return await open_stream(port, payload, stalled, rcvbuf)

    opened = await asyncio.gather(*(one() for _ in range(count)))
    return {local_port: stream for stream, local_port in opened}


async def normal_request(url: str, max_tokens: int = 32, timeout_s: float = 30.0) -> dict[str, Any]:
    """One streamed chat request read to its end: status, events, whether [DONE] came, seconds."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "stream": True,
            "max_tokens": max_tokens}
    started = time.perf_counter()
    try:
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
                    session.post(url + "/v1/chat/completions", json=body) as response):
            data = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"ok": False, "status": None, "events": 0, "done": False, "seconds": time.perf_counter() - started,
                "error": repr(exc)[:200]}
    events = data.count(b"data: ")
    done = b"data: [DONE]" in data
    return {"ok": status == 200 and done, "status": status, "events": events, "done": done,
            "seconds": time.perf_counter() - started, "error": "" if status == 200 else data[:200].decode("replace")}


async def warm_up(url: str, requests: int) -> None:
    """A few normal streams read to the end, two at a time: the gateway's first requests are not measured."""
    for start in range(0, requests, 2):
        results = await asyncio.gather(*(normal_request(url) for _ in range(min(2, requests - start))))
        failed = [r for r in results if not r["ok"]]
        if failed:
            raise RuntimeError(f"warm-up request failed: {failed[0]}")
