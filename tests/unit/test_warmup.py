"""A worker coming up answers a warm-up request per model before the pool routes to it."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.unit.fakes import CHAT, MODEL, ScriptedWorker, gateway_client, mock_client, settings_for


@pytest.mark.anyio
async def test_a_worker_is_warmed_up_before_its_first_request() -> None:
    worker = ScriptedWorker(on_post=lambda request: httpx.Response(200, json={"choices": []}))
    async with gateway_client(settings_for(worker.url, warmup_timeout_s=30), mock_client(worker)) as (client, _):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    first = worker.seen[0]
    assert first.url.path == "/v1/completions" and json.loads(first.content)["max_tokens"] == 1
    assert json.loads(first.content)["model"] == MODEL
    assert worker.seen[1].url.path == "/v1/chat/completions"


@pytest.mark.anyio
async def test_a_worker_whose_warm_up_fails_gets_no_traffic_until_it_succeeds() -> None:
    failing = [True]

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions" and failing[0]:
            return httpx.Response(500)
        return httpx.Response(200, json={"choices": []})

    cold = ScriptedWorker(url="http://cold:1", on_post=answer)
    warm = ScriptedWorker(url="http://warm:1", on_post=lambda request: httpx.Response(200, json={"choices": []}))
    settings = settings_for(cold.url, warm.url, warmup_timeout_s=30, routing="round_robin")
    async with gateway_client(settings, mock_client(cold, warm)) as (client, app):
        for _ in range(4):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert [r.url.path for r in cold.seen] == ["/v1/completions"], "only its warm-up"
        failing[0] = False
        pool = app.state.services.pool
        await pool.refresh()  # the next health check warms it up again, and this time it answers
        if not pool.workers[0].healthy:
            await pool.refresh()
        assert pool.workers[0].healthy
        for _ in range(4):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert sum(r.url.path == "/v1/chat/completions" for r in cold.seen) == 2
