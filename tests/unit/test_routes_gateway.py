"""Model routes through the gateway: canary weights, sticky versions, an admin's pin, changes through the admin
API taking effect at once, refusals that keep the routes in force, and fallbacks before the first byte."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from tests.unit.fakes import ScriptedWorker, mock_client, settings_for

ROUTES = {"routes": {"chat": {"targets": [{"model": "demo-v1", "weight": 90}, {"model": "demo-v2", "weight": 10}],
                              "fallbacks": ["demo-small"]}}}


def answering(model: str) -> ScriptedWorker:
    return ScriptedWorker(url=f"http://{model}:1", models=[model],
                          on_post=lambda request: httpx.Response(200, json={"model": model, "choices": []}))


def ask(user: str | None = None, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **extra}
    if user is not None:
        body["user"] = user
    return body


class Gateway:
    def __init__(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        self.app, self.client = app, client

    async def served(self, body: dict[str, object], **headers: str) -> str:
        answer = await self.client.post("/v1/chat/completions", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.content)["model"] == answer.headers["x-specgate-model"]
        return answer.headers["x-specgate-model"]


@pytest.fixture
async def gateway(tmp_path: Path) -> object:
    routes = tmp_path / "routes.yaml"
    routes.write_text(json.dumps(ROUTES))
    workers = [answering(model) for model in ("demo-v1", "demo-v2", "demo-small")]
    app = create_app(settings_for(*(w.url for w in workers), routes_file=routes), worker_client=mock_client(*workers))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 5000)), base_url="http://gateway") as client:
        yield Gateway(app, client)


@pytest.mark.anyio
async def test_versions_follow_the_weights_and_stay_with_a_user(gateway: Gateway) -> None:
    listed = (await gateway.client.get("/v1/models")).json()["data"]
    assert [card["id"] for card in listed] == ["chat"], "the public name, not the versions behind it"
    by_user = {user: await gateway.served(ask(user)) for user in (f"user-{i}" for i in range(300))}
    shares = Counter(by_user.values())
    assert set(shares) == {"demo-v1", "demo-v2"} and 0.04 < shares["demo-v2"] / 300 < 0.2, shares
    for user in list(by_user)[:20]:
        assert await gateway.served(ask(user)) == by_user[user], "one conversation stays on one version"
    session = await gateway.served(ask(), **{"x-session-id": "s-1"})
    assert all([await gateway.served(ask(), **{"x-session-id": "s-1"}) == session for _ in range(5)])


@pytest.mark.anyio
async def test_a_weight_change_takes_effect_at_once_and_a_bad_one_changes_nothing(gateway: Gateway) -> None:
    client = gateway.client
    canary_only = {"targets": [{"model": "demo-v1", "weight": 0}, {"model": "demo-v2", "weight": 100}]}
    assert (await client.put("/admin/routes/chat", json=canary_only)).status_code == 200
    assert {await gateway.served(ask(f"u{i}")) for i in range(30)} == {"demo-v2"}
    for bad, problem in (({"targets": [{"model": "demo-v9", "weight": 1}]}, "demo-v9"),
                         ({"targets": [{"model": "demo-v1", "weight": 0}]}, "all zero"),
                         ({"targets": [{"model": "demo-v1", "weight": -1}]}, "negative"),
                         ({"targets": [{"model": "demo-v1", "weight": 1}], "fallbacks": ["chat"]}, "cycle")):
        refused = await client.put("/admin/routes/chat", json=bad)
        assert refused.status_code == 400 and problem in refused.json()["error"]["message"], refused.text
    in_force = (await client.get("/admin/routes")).json()["routes"]["chat"]
    assert in_force["targets"][1] == {"model": "demo-v2", "weight": 100.0}, "refused changes changed nothing"
    rollback = {"targets": [{"model": "demo-v1", "weight": 100}, {"model": "demo-v2", "weight": 0}]}
    assert (await client.put("/admin/routes/chat", json=rollback)).status_code == 200
    assert {await gateway.served(ask(f"u{i}")) for i in range(30)} == {"demo-v1"}


@pytest.mark.anyio
async def test_only_this_machine_may_change_routes_or_pin_when_no_keys_are_set(gateway: Gateway) -> None:
    assert await gateway.served(ask("u1"), **{"x-specgate-route-to": "demo-v2"}) == "demo-v2"
    wrong_pin = await gateway.client.post("/v1/chat/completions", json=ask(),
                                          headers={"x-specgate-route-to": "demo-v7"})
    assert wrong_pin.status_code == 400
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app, client=("10.1.2.3", 5000)),
                                 base_url="http://gateway") as remote:
        assert (await remote.put("/admin/routes/chat", json={"targets": [{"model": "demo-v2", "weight": 1}]})
                ).status_code == 403
        pinned = await remote.post("/v1/chat/completions", json=ask(), headers={"x-specgate-route-to": "demo-v2"})
        assert pinned.status_code == 403


@pytest.mark.anyio
async def test_a_version_that_cannot_take_the_request_falls_back_in_order(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(json.dumps(ROUTES))
    broken = ScriptedWorker(url="http://demo-v1:1", models=["demo-v1"], on_post=lambda r: httpx.Response(500))
    workers = [broken, answering("demo-v2"), answering("demo-small")]
    settings = settings_for(*(w.url for w in workers), routes_file=routes, retry_backoff_s=0.0)
    app = create_app(settings, worker_client=mock_client(*workers))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        answer = await client.post("/v1/chat/completions", json=ask(), headers={"x-specgate-route-to": "demo-v1"})
        assert answer.status_code == 200 and answer.headers["x-specgate-model"] == "demo-small"
        assert broken.seen, "the pinned version was tried first"


@pytest.mark.anyio
async def test_a_change_on_one_replica_is_in_force_on_the_other_within_a_second(tmp_path: Path,
                                                                                  redis_url: str) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(json.dumps(ROUTES))
    workers = [answering(model) for model in ("demo-v1", "demo-v2", "demo-small")]
    settings = settings_for(*(w.url for w in workers), routes_file=routes, redis_url=redis_url)
    first, second = (create_app(settings, worker_client=mock_client(*workers)) for _ in range(2))
    async with first.router.lifespan_context(first), second.router.lifespan_context(second), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://a") as a, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://b") as b:
        canary_only = {"targets": [{"model": "demo-v1", "weight": 0}, {"model": "demo-v2", "weight": 1}]}
        assert (await a.put("/admin/routes/chat", json=canary_only)).status_code == 200
        changed_at = time.monotonic()
        while (await b.get("/admin/routes")).json()["changed_through_admin_api"] != ["chat"]:
            assert time.monotonic() - changed_at < 1.5, "the other replica never took the change"
            await asyncio.sleep(0.02)
        answers = [await b.post("/v1/chat/completions", json=ask(f"u{i}")) for i in range(20)]
        assert {answer.headers["x-specgate-model"] for answer in answers} == {"demo-v2"}
        assert (await b.delete("/admin/routes/chat")).status_code == 200, "undone from either replica"
        while (await a.get("/admin/routes")).json()["changed_through_admin_api"]:
            assert time.monotonic() - changed_at < 5, "the undo never reached the first replica"
            await asyncio.sleep(0.02)
        assert (await a.get("/admin/routes")).json()["routes"]["chat"] == {**ROUTES["routes"]["chat"], "shadow": None,
            "targets": [{"model": "demo-v1", "weight": 90.0}, {"model": "demo-v2", "weight": 10.0}]}


@pytest.mark.anyio
async def test_a_change_the_shared_store_cannot_record_is_refused(tmp_path: Path) -> None:
    from tests.support import free_port

    routes = tmp_path / "routes.yaml"
    routes.write_text(json.dumps(ROUTES))
    workers = [answering(model) for model in ("demo-v1", "demo-v2", "demo-small")]
    settings = settings_for(*(w.url for w in workers), routes_file=routes,
                            redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(settings, worker_client=mock_client(*workers))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        refused = await client.put("/admin/routes/chat", json={"targets": [{"model": "demo-v2", "weight": 1}]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "routes_unavailable"
        assert (await client.get("/admin/routes")).json()["changed_through_admin_api"] == []
        answer = await client.post("/v1/chat/completions", json=ask("u1"), headers={"x-specgate-route-to": "demo-v1"})
        assert answer.status_code == 200, "requests are served from the routes in force"
