"""Serve stage: run the app under uvicorn, draining open streams gracefully on SIGTERM or Ctrl-C."""

from __future__ import annotations

import gc
import logging
import socket
from types import FrameType

import uvicorn

from gateway.app import create_app
from gateway.drain import Drainer
from gateway.settings import GatewaySettings

# Beyond the drain grace, so streams end with the gateway's own error event rather than being cut.
UVICORN_MARGIN_S = 5


class DrainingServer(uvicorn.Server):
    """uvicorn that tells the gateway's drainer first when a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, drainer: Drainer) -> None:
        super().__init__(config)
        self._drainer = drainer

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Everything built at startup moves out of the collector's reach, so collections stay short and a
        # full one does not pause every open stream while it walks the app's import-time objects.
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._drainer.begin()
        super().handle_exit(sig, frame)


def serve(settings: GatewaySettings) -> None:
    # httpx logs every upstream request at INFO: a log line per request on the hot path.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + UVICORN_MARGIN_S,
    )
    DrainingServer(config, app.state.drainer).run()
