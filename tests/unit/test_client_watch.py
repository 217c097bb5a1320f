"""A client that goes away at any stage has its worker request closed at once (real HTTP on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
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
    wait_until,
)


@contextlib.contextmanager
def gateway_before(worker: SlowWorker, **overrides: object) -> Iterator[str]:
    with serve_in_thread(worker) as worker_url:
        app = create_app(settings_for(worker_url, **overrides))
        with serve_in_thread(app) as gateway_url:
            yield gateway_url


def test_mid_stream_disconnect_closes_the_worker_request() -> None:
    worker = SlowWorker(vllm_stream([1] * 200), gap_s=0.05)
    with gateway_before(worker) as url, httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")]
            assert len(received) >= 2
        assert wait_until(worker.disconnected.is_set, timeout_s=2.0), "worker request still open after 2 s"
        assert not worker.completed.is_set()
        metrics = client.get("/metrics").text
    assert 'specgate_client_disconnects_total{model="demo"} 1.0' in metrics


def test_the_response_ends_at_done_and_the_worker_connection_still_goes_back_to_the_pool() -> None:
    # The worker holds its body's end for 0.8 s after [DONE] (the gateway waits up to BODY_END_WAIT_S = 1 s for
    # it): the client's response must not wait for it (its next request on that connection would), yet the
    # gateway must still read it to reuse the connection.
    worker = SlowWorker(vllm_stream([1, 1]), gap_s=0.0, end_delay_s=0.8)
    with gateway_before(worker) as url, httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(2):
            started = time.perf_counter()
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
                body = b"".join(response.iter_bytes())
            assert body.endswith(b"data: [DONE]\n\n")
            assert time.perf_counter() - started < 0.6, "the response waited for the worker's terminator"
            assert wait_until(worker.completed.is_set, timeout_s=5.0)
            worker.completed.clear()
            assert requests_finish(client), "the request was never recorded as finished"
        assert not worker.disconnected.is_set()
    assert len(worker.clients) == 2 and worker.clients[0] == worker.clients[1], "a new worker connection per request"


def test_disconnect_before_the_first_token_closes_the_worker_request() -> None:
    worker = SlowWorker(vllm_stream([1]), gap_s=0.0, first_delay_s=30)
    with gateway_before(worker) as url:
        _abandon_after(url, {**CHAT, "stream": True}, worker.started)
        assert wait_until(worker.disconnected.is_set, timeout_s=2.0)


def test_disconnect_during_a_non_streaming_call_closes_the_worker_request() -> None:
    worker = SlowWorker([b'{"choices": []}'], gap_s=0.0, first_delay_s=30)
    with gateway_before(worker) as url:
        _abandon_after(url, CHAT, worker.started)
        assert wait_until(worker.disconnected.is_set, timeout_s=2.0)


def test_disconnect_while_queued_never_reaches_a_worker() -> None:
    worker = SlowWorker(vllm_stream([1] * 100), gap_s=0.05)
    with gateway_before(worker, max_concurrency=1, max_queue=4) as url:
        with httpx.Client(base_url=url, timeout=10) as client, client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as holding:
            lines = holding.iter_lines()  # kept: a collected iterator closes the connection
            next(lines)
            queued_seen = threading.Event()

            def queued() -> bool:
                text = httpx.get(url + "/metrics").text
                return "specgate_queued 1.0" in text

            abandoned = threading.Thread(target=_abandon_after, args=(url, CHAT, queued_seen))
            abandoned.start()
            assert wait_until(queued, timeout_s=3.0)
            queued_seen.set()
            abandoned.join(timeout=5)
            assert wait_until(lambda: "specgate_queued 0.0" in httpx.get(url + "/metrics").text, timeout_s=2.0)
        assert wait_until(
            lambda: 'specgate_requests_total{model="demo",status="499",worker="none"} 1.0'
            in httpx.get(url + "/metrics").text,
            timeout_s=2.0,
        )


def test_a_wait_that_ends_in_a_429_is_counted_as_queue_time() -> None:
    worker = SlowWorker(vllm_stream([1] * 100), gap_s=0.05)
    with (
        gateway_before(worker, max_concurrency=1, max_queue=4, queue_timeout_s=0.3) as url,
        httpx.Client(base_url=url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as holding,
    ):
        lines = holding.iter_lines()  # kept: a collected iterator closes the connection
        next(lines)
        refused = client.post("/v1/chat/completions", json=CHAT)
        # The holder is still streaming, so the one queue time recorded is the refused request's.
        metrics = client.get("/metrics").text
    assert refused.status_code == 429
    assert 'specgate_queue_seconds_count{model="demo"} 1.0' in metrics
    total = next(line for line in metrics.splitlines() if line.startswith('specgate_queue_seconds_sum{model="demo"}'))
    # uvloop's timers count whole milliseconds from the loop's cached time, so the 0.3 s timeout can fire up
    # to 1 ms before 0.3 s have passed on the gateway's clock (a CI run recorded 0.29982 s).
    assert float(total.split()[-1]) >= 0.3 - 0.001


def _abandon_after(url: str, body: dict[str, object], moment: threading.Event) -> None:
    """Send a request on a raw socket and hang up once `moment` is set."""
    import json
    import socket

    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        assert moment.wait(timeout=5), "the awaited moment never came"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)


@pytest.mark.anyio
async def test_client_watch_turns_only_the_clients_leaving_into_client_disconnected() -> None:
    from gateway.admission.client_watch import ClientWatch
    from gateway.errors import ClientDisconnected

    messages: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    watch = ClientWatch(messages.get)
    watch.start()
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(ClientDisconnected), watch.guard():
        messages.put_nowait({"type": "http.request"})  # a late body part is not a disconnect
        messages.put_nowait({"type": "http.disconnect"})
        await asyncio.sleep(5)
    assert task.cancelling() == 0, "the watcher's cancellation was taken back"
    await asyncio.sleep(0)  # the task is usable again: no cancellation left pending

    other = ClientWatch(messages.get)
    other.start()

    async def cancelled_from_elsewhere() -> None:
        with other.guard():
            await asyncio.sleep(5)

    work = asyncio.ensure_future(cancelled_from_elsewhere())
    await asyncio.sleep(0.01)
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    await other.stop()


@pytest.mark.anyio
async def test_a_stopped_watch_ignores_the_disconnect_uvicorn_reports_after_the_response() -> None:
    from gateway.admission.client_watch import ClientWatch

    messages: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    watch = ClientWatch(messages.get)
    watch.start()
    await asyncio.sleep(0)
    await watch.stop()
    messages.put_nowait({"type": "http.disconnect"})
    await asyncio.sleep(0.01)  # would raise CancelledError here if the watcher still ran
    assert not watch.client_left
