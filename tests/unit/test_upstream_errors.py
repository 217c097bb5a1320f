"""Worker failures answer in the OpenAI error envelope with the right status, retried on another worker if they may."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.errors import GatewayError, UpstreamFailed, UpstreamTimeout
from gateway.upstream.http1.errors import (
    WorkerBadResponse,
    WorkerBodyCut,
    WorkerConnectTimeout,
    WorkerHungUp,
    WorkerReadTimeout,
    WorkerUnreachable,
)
from tests.unit.envelopes import assert_envelope, gateway_post, never_called
from tests.unit.fakes import CHAT, ScriptedWorker, chat_chunk, gateway_client, mock_client, settings_for

pytestmark = pytest.mark.anyio


async def test_worker_4xx_passes_through_unchanged_and_is_not_retried() -> None:
    raw = b'{"error":{"message":"prompt too long","type":"BadRequestError","param":null,"code":400}}'
    worker = ScriptedWorker(on_post=lambda r: httpx.Response(400, content=raw))
    other = ScriptedWorker(url="http://worker-b:8100", on_post=lambda r: httpx.Response(400, content=raw))
    async with gateway_client(settings_for(worker.url, other.url), mock_client(worker, other)) as (client, _):
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400
    assert response.content == raw
    assert len(worker.seen) + len(other.seen) == 1


async def test_a_worker_4xx_that_is_not_an_envelope_comes_back_in_one() -> None:
    # Something between the gateway and vLLM (a proxy, a wrong port) answering in its own format.
    worker = ScriptedWorker(on_post=lambda r: httpx.Response(404, text="<html>Not Found</html>"))
    response = await gateway_post(worker, CHAT)
    error = assert_envelope(response, 404, "invalid_request_error")
    assert response.headers["content-type"] == "application/json"
    assert "Not Found" in error["message"]


async def test_worker_5xx_on_every_worker_is_a_502_with_retry_after() -> None:
    workers = [ScriptedWorker(url=f"http://w{i}:8100", on_post=lambda r: httpx.Response(500, text="boom"))
               for i in range(2)]
    settings = settings_for(*(w.url for w in workers))
    async with gateway_client(settings, mock_client(*workers)) as (client, _):
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert_envelope(response, 502, "upstream_error")
    assert response.headers["retry-after"]
    assert [len(w.seen) for w in workers] == [1, 1], "each worker tried once"


@pytest.mark.parametrize("status, text", [(503, "draining"), (429, "slow down")])
async def test_a_failing_or_busy_worker_is_retried_on_another_before_the_first_byte(status: int, text: str) -> None:
    bad = ScriptedWorker(url="http://bad:8100", on_post=lambda r: httpx.Response(status, text=text))
    good = ScriptedWorker(url="http://good:8100", on_post=lambda r: httpx.Response(200, json={"choices": []}))
    settings = settings_for(bad.url, good.url, routing="round_robin")
    async with gateway_client(settings, mock_client(bad, good)) as (client, _):
        answers = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert len(good.seen) == 4


async def test_a_429_from_every_worker_is_a_429_with_the_workers_retry_after() -> None:
    busy = [
        ScriptedWorker(url=f"http://busy-{n}:8100",
                       on_post=lambda r: httpx.Response(429, text="slow down", headers={"retry-after": "7"}))
        for n in range(2)
    ]
    settings = settings_for(*(w.url for w in busy), routing="round_robin")
    async with gateway_client(settings, mock_client(*busy)) as (client, app):
        response = await client.post("/v1/chat/completions", json=CHAT)
        workers = app.state.services.pool.admin_view()
    error = assert_envelope(response, 429, "rate_limit_error")
    assert error["code"] == "worker_overloaded"
    assert response.headers["retry-after"] == "7"
    assert [len(w.seen) for w in busy] == [1, 1], "each worker tried once"
    assert all(w["consecutive_failures"] == 0 for w in workers), "busy is not a failure"


async def test_connection_refused_is_a_fast_502() -> None:
    worker = ScriptedWorker()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    worker.on_post = refuse
    assert_envelope(await gateway_post(worker, CHAT), 502, "upstream_error")


async def test_worker_read_timeout_is_a_504() -> None:
    worker = ScriptedWorker()

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no bytes", request=request)

    worker.on_post = slow
    assert_envelope(await gateway_post(worker, {**CHAT, "stream": True}), 504, "upstream_timeout")


async def test_no_healthy_worker_is_a_503_with_retry_after() -> None:
    worker = ScriptedWorker(on_post=never_called)
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, app):
        worker.healthy = False
        await app.state.services.pool.refresh()
        response = await client.post("/v1/chat/completions", json=CHAT)
        ready = await client.get("/ready")
    assert_envelope(response, 503)
    assert response.headers["retry-after"]
    assert ready.status_code == 503


async def test_mid_stream_reset_becomes_one_error_event_and_no_finish_reason() -> None:
    async def reset_after_two() -> AsyncIterator[bytes]:
        yield chat_chunk("", 0, role="assistant")
        yield chat_chunk("a", 1)
        raise httpx.RemoteProtocolError("peer closed connection")

    worker = ScriptedWorker(on_post=lambda r: httpx.Response(200, content=reset_after_two()))
    response = await gateway_post(worker, {**CHAT, "stream": True})
    assert response.status_code == 200
    events = [e for e in response.content.split(b"\n\n") if e]
    assert len(events) == 3
    final = json.loads(events[-1][6:])
    assert final["error"]["type"] == "upstream_error"
    assert b"finish_reason\": \"stop" not in response.content
    assert b"[DONE]" not in response.content


async def test_stream_that_ends_without_done_is_an_error_not_a_fake_finish() -> None:
    worker = ScriptedWorker(on_post=lambda r: httpx.Response(200, content=chat_chunk("a", 1)))
    response = await gateway_post(worker, {**CHAT, "stream": True})
    final = json.loads([e for e in response.content.split(b"\n\n") if e][-1][6:])
    assert "error" in final


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        (WorkerUnreachable("could not connect to worker: refused"), 502, "upstream_error"),
        (WorkerConnectTimeout("could not connect to worker in time"), 502, "upstream_error"),
        (WorkerHungUp("worker closed the connection"), 502, "upstream_error"),
        (WorkerBodyCut("worker closed or reset the connection mid-body"), 502, "upstream_error"),
        (WorkerBadResponse("unreadable answer from the worker"), 502, "upstream_error"),
        (WorkerReadTimeout("worker sent nothing in time"), 504, "upstream_timeout"),
    ],
)
def test_the_worker_clients_errors_are_the_gateways_upstream_errors(
    error: GatewayError, status: int, error_type: str
) -> None:
    assert isinstance(error, UpstreamTimeout if status == 504 else UpstreamFailed)
    assert error.http_status == status and error.envelope()["error"]["type"] == error_type


async def test_a_worker_port_with_nothing_listening_is_a_failed_connect_over_the_default_client() -> None:
    from gateway.upstream.calls import Upstream
    from gateway.upstream.http1.client import Http1WorkerClient
    from tests.support import free_port

    url = f"http://127.0.0.1:{free_port()}"
    settings = settings_for(url)
    worker_client = Http1WorkerClient(settings)
    try:
        upstream = Upstream(worker_client, settings, time.perf_counter)
        with pytest.raises(UpstreamFailed, match=r"^could not connect to worker: "):
            await upstream.open_stream(url, "/v1/chat/completions", b"{}", "r1")
        with pytest.raises(UpstreamFailed, match=r"^could not connect to worker: "):
            await upstream.complete(url, "/v1/chat/completions", b"{}", "r2")
    finally:
        await worker_client.aclose()
