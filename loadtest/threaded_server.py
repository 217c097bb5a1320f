"""Test and benchmark helper: serve an ASGI app under a real uvicorn in a background thread on a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


@contextlib.contextmanager
def serve_in_thread(
    app: Any, *, host: str = "127.0.0.1", startup_timeout_s: float = 10.0, loop: str = "uvloop"
) -> Iterator[str]:
    """Yield the base URL (http://host:port) while `app` is served; stop the server on exit.

    The socket is bound here (port 0) and handed to uvicorn, so there is no window in which another
    process could take the port between choosing it and listening on it.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, loop=loop, http="httptools", lifespan="on", access_log=False,
                            log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("server thread exited during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise TimeoutError(f"server did not start within {startup_timeout_s}s")
        time.sleep(0.005)
    url_host = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{url_host}:{port}"
    finally:
        # Graceful, so lifespan shutdown runs; streams left open get timeout_graceful_shutdown (1 s) to finish.
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
