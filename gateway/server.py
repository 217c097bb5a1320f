"""Runs the app under uvicorn, draining open streams gracefully on SIGTERM or Ctrl-C."""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import signal
import socket
from collections.abc import Iterator
from logging.handlers import QueueHandler, QueueListener
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from gateway.admission.shutdown import Drainer
from gateway.app import create_app
from gateway.edge import EdgeLimits, edge_protocol
from gateway.settings import GatewaySettings

# Beyond the drain grace, so streams end with the gateway's own error event rather than being cut.
UVICORN_MARGIN_S = 5
# Net new container objects before a young collection (CPython's default is 700), and middle-generation
# collections between two full ones (default 10). Cyclic garbage stays bounded by the first: 100,000 objects
# left to the collector start a collection. Set high so that streams starting and ending under load do not
# set off collections that pause every stream and find nothing (docs/design/performance.md, "gc thresholds").
YOUNG_COLLECTION_AFTER = 100_000
FULL_COLLECTION_AFTER = 1000
# libuv (uvloop's core) accepts one connection per listening handle per event-loop turn (libuv#3696), and with
# hundreds of streams to relay a turn is long, so new connections wait in the kernel's queue. Each extra handle
# on the same socket lets one more in per turn (docs/design/performance.md, "New connections under load").
ACCEPT_HANDLES = 16


class DrainingServer(uvicorn.Server):
    """uvicorn that tells the gateway's drainer first when a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, drainer: Drainer) -> None:
        super().__init__(config)
        self._drainer = drainer
        self._stop_asked = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Everything built at startup moves out of the collector's reach, so collections stay short and a
        # full one does not pause every open stream while it walks the app's import-time objects.
        gc.collect()
        gc.freeze()
        # The requests' own objects are freed by reference counting (no request leaves a reference cycle:
        # gateway/app.py, gateway/middleware/fast_routes.py, tests/unit/test_garbage.py), so collections find
        # nothing, yet at CPython's defaults open streams set off young, middle and full collections every second
        # or few, each a pause for all streams; with these thresholds only growth of the live set by 100,000
        # objects starts one (docs/design/performance.md, "gc thresholds").
        gc.set_threshold(YOUNG_COLLECTION_AFTER, gc.get_threshold()[1], FULL_COLLECTION_AFTER)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # The signal is not kept for uvicorn to raise again after its shutdown: a drained gateway exits 0.
        if self._stop_asked or not self._drainer.bound:
            # A second signal stops the server now (a second Ctrl-C without waiting for connections).
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._stop_asked = True
        # The server keeps accepting and answering (503s, `connection: close`) until the drain is over.
        self._drainer.begin(self._drained)

    def _drained(self) -> None:
        self.should_exit = True


@contextlib.contextmanager
def logging_off_the_loop() -> Iterator[None]:
    """Hand log records to a thread that writes them: a slow stderr (a file on a busy disk, a pipe that a
    log collector drains late) must not stall every open stream for the length of one write."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    if not handlers:
        yield
        return
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = QueueListener(records, *handlers, respect_handler_level=True)
    root.handlers = [QueueHandler(records)]
    listener.start()
    try:
        yield
    finally:
        listener.stop()
        root.handlers = handlers


def serve(settings: GatewaySettings) -> None:
    # httpx logs every request it makes at INFO; the gateway's worker calls do not use it, but `specgate up`'s
    # supervisor polls restarting workers' /health with it (engine/launch.py) in this process.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(settings)
    config = server_config(settings, app)
    with logging_off_the_loop():
        handles = listening_handles(config, ACCEPT_HANDLES, settings.client_send_buffer_bytes)
        DrainingServer(config, app.state.drainer).run(sockets=handles)


def server_config(settings: GatewaySettings, app: ASGIApp) -> uvicorn.Config:
    """The server the gateway runs under, as `serve` runs it (tests serve the app with the same)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # The gateway never reads the client's address (its logs and metrics have none), so uvicorn's
        # X-Forwarded-For middleware would only be one more layer for every request to pass.
        proxy_headers=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + UVICORN_MARGIN_S,
        # Bounded request heads, head and body timeouts, malformed framing answered in the OpenAI envelope.
        http=edge_protocol(EdgeLimits(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            client_write_buffer_bytes=settings.client_write_buffer_bytes,
        )),
    )


def listening_handles(config: uvicorn.Config, count: int, send_buffer_bytes: int = 0) -> list[socket.socket]:
    """The bound socket and `count - 1` duplicates of it: one accept queue, `count` handles taking from it.
    Connections accepted from it inherit its send buffer size (Linux), which bounds what the kernel queues for a
    client that has stopped reading: past it the stream's send timeout counts (an SSE stream needs little)."""
    bound = config.bind_socket()
    if send_buffer_bytes:
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    return [bound, *(bound.dup() for _ in range(count - 1))]
