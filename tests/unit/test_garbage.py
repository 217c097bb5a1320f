"""A finished request leaves nothing for the garbage collector: everything it made is freed by reference counting.

Cyclic garbage is what makes the collector run under steady load, and each of its runs pauses every open stream
(docs/design/performance.md, "No cyclic garbage per request"). Real uvicorn on loopback, as in production: the
cycle this guards against went through uvicorn's own request object.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import httpx
import pytest

from gateway.app import create_app
from tests.unit.fakes import (
    CHAT,
    SlowWorker,
    requests_finish,
    serve_in_thread,
    settings_for,
    vllm_stream,
)

# Libraries on the gateway's request path; the test's own client (httpx) is left out.
SERVER_SIDE = ("gateway", "uvicorn", "starlette", "fastapi", "sse_starlette", "aiohttp", "httpx_aiohttp", "anyio")


def _server_side(obj: object) -> bool:
    if isinstance(obj, dict) and "asgi" in obj:
        return True  # an ASGI scope
    module = type(obj).__module__
    # uvicorn's log formatters are replaced when a server in this process configures logging, not per request.
    return module.split(".")[0] in SERVER_SIDE and module != "uvicorn.logging"


@pytest.fixture
def kept_garbage() -> Iterator[list[object]]:
    """gc.garbage while the test runs: the collector keeps what it finds unreachable instead of freeing it."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()


def test_streamed_and_complete_requests_leave_no_cyclic_garbage(kept_garbage: list[object]) -> None:
    # The first event after the head and the others apart, as vLLM sends them: the stream opens from the worker
    # connection's read callback, and the relay writes the rest from there too.
    worker = SlowWorker(vllm_stream([1, 1, 1]), gap_s=0.005, prefill_s=0.02)
    with serve_in_thread(worker) as worker_url:
        app = create_app(settings_for(worker_url, request_log=False))
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            client.post("/v1/chat/completions", json={**CHAT, "stream": True}).raise_for_status()  # warm-up
            assert requests_finish(client)
            gc.collect()
            kept_garbage.clear()
            for stream in (True, True, True, False, False):
                response = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                assert response.status_code == 200
                if stream:
                    assert response.text.endswith("data: [DONE]\n\n")
            assert requests_finish(client)
            gc.collect()
            left = sorted({f"{type(obj).__module__}.{type(obj).__qualname__}" for obj in kept_garbage
                           if _server_side(obj)})
    assert left == [], f"requests left cyclic garbage: {left}"
