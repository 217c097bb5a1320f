"""The floor of a Python relay: a measurement aid for the side-by-side benchmark (target `bare-relay`), not a
product path.

    python -m benchmarks.bare_relay --workers http://127.0.0.1:8000 --port 8930

uvloop, one asyncio Protocol per client connection parsing with httptools (the parser uvicorn serves with),
and the gateway's own worker client (gateway/upstream/http1/client.py). Each POST goes to the one worker with its path
and body; each read of the worker's answer leaves as one chunked write. No validation, routing, admission,
event parsing, token counting, metrics, timers, ASGI or framework: what it spends per event is what any
Python gateway on this event loop spends at least, so set beside specgate and vllm-router it shows how much
of specgate's cost is its own work and how much the language and loop's. It does not pipeline requests on a
connection, honour client flow control or answer errors in the OpenAI shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from collections.abc import Sequence
from typing import cast

import httptools
import uvloop

from gateway.server import ACCEPT_HANDLES
from gateway.settings import GatewaySettings
from gateway.upstream.http1.client import Http1WorkerClient

HEALTH_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
STREAM_HEAD = b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
REQUEST_ID = "bare-relay"


class ClientConnection(asyncio.Protocol):
    """One client connection; a request complete in the parser becomes one task that relays its answer."""

    def __init__(self, client: Http1WorkerClient, worker_url: str) -> None:
        self._client = client
        self._worker_url = worker_url
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._serving: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each event leaves at once, as specgate's

    def connection_lost(self, exc: Exception | None) -> None:
        if self._serving is not None:
            self._serving.cancel()  # the worker request is closed, so the worker aborts it

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method, path, body = self._parser.get_method(), self._url.decode("latin-1"), b"".join(self._body)
        self._url, self._body = b"", []
        self._serving = asyncio.get_running_loop().create_task(self._serve(method, path, body))

    async def _serve(self, method: bytes, path: str, body: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if method != b"POST":
            transport.write(HEALTH_ANSWER if path in ("/health", "/ready") else NOT_FOUND)
            return
        reply = await self._client.post(self._worker_url, path, body, REQUEST_ID, streaming=True)
        try:
            content_type = reply.headers.get("content-type", "application/json").encode("latin-1")
            transport.write(STREAM_HEAD % (reply.status, content_type))
            while chunk := await reply.read():
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            transport.write(LAST_CHUNK)
        finally:
            await reply.aclose()


async def serve(worker_url: str, host: str, port: int) -> None:
    settings = GatewaySettings(workers=[worker_url])
    client = Http1WorkerClient(settings)
    loop = asyncio.get_running_loop()
    bound = socket.create_server((host, port), backlog=2048)
    # As the gateway listens (gateway/server.py): several handles on one socket, so a ramp-up's connections
    # are not let in one per event-loop turn.
    servers = [await loop.create_server(lambda: ClientConnection(client, worker_url), sock=handle)
               for handle in (bound, *(bound.dup() for _ in range(ACCEPT_HANDLES - 1)))]
    try:
        await asyncio.gather(*(server.serve_forever() for server in servers))
    finally:
        await client.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", required=True, help="the one worker's base URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8930)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.workers, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
