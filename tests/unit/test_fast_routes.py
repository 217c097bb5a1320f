"""POSTs to the forwarding routes skip Starlette's router and exception middleware, and answer as they did."""

from __future__ import annotations

import httpx
import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from gateway.api import routes as api
from gateway.middleware.fast_routes import FastRoutes
from gateway.schemas import OpenAICall
from tests.unit.fakes import CHAT, MODEL, ScriptedWorker, gateway_client, mock_client, settings_for

pytestmark = pytest.mark.anyio



async def _teapot(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 418, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_posts_to_forwarding_routes_bypass_the_router_and_other_methods_still_reach_it() -> None:
    worker = ScriptedWorker(on_post=lambda r: httpx.Response(200, json={"choices": [], "usage": None}))
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, app):
        for route in app.router.routes:
            if isinstance(route, Route) and route.path in api.FORWARDING_ROUTES:
                route.app = _teapot  # what the router would answer with, were it asked
        chat = await client.post(api.CHAT_PATH, json=CHAT, headers={"x-request-id": "hot-1"})
        completion = await client.post(api.COMPLETIONS_PATH, json={"model": MODEL, "prompt": "hi"})
        wrong_method = await client.get(api.CHAT_PATH)
    assert chat.status_code == completion.status_code == 200, (chat.text, completion.text)
    assert chat.headers["x-request-id"] == "hot-1" and completion.headers["x-request-id"]
    assert [request.url.path for request in worker.seen if request.method == "POST"] == [
        api.CHAT_PATH, api.COMPLETIONS_PATH,
    ]
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


async def test_an_unexpected_error_in_a_forwarding_handler_is_a_500_in_the_openai_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(*args: object) -> OpenAICall:
        raise RuntimeError("a bug")

    worker = ScriptedWorker(on_post=lambda r: httpx.Response(200, json={"choices": []}))
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, app):
        monkeypatch.setattr(app.state.forwarding, "_validated", broken)
        failed = await client.post(api.CHAT_PATH, json=CHAT)
        monkeypatch.undo()
        after = await client.post(api.CHAT_PATH, json=CHAT)
        rejected = await client.post(api.CHAT_PATH, json={"model": MODEL})
    assert failed.status_code == 500 and failed.headers["x-request-id"]
    assert failed.json()["error"]["message"] == "internal gateway error"
    assert after.status_code == 200
    assert rejected.status_code == 400 and rejected.json()["error"]["type"] == "invalid_request_error"


async def test_api_keys_guard_the_forwarding_routes() -> None:
    worker = ScriptedWorker(on_post=lambda r: httpx.Response(200, json={"choices": []}))
    async with gateway_client(settings_for(worker.url, api_keys="k1"), mock_client(worker)) as (client, _):
        refused = await client.post(api.CHAT_PATH, json=CHAT)
        allowed = await client.post(api.CHAT_PATH, json=CHAT, headers={"authorization": "Bearer k1"})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.headers["x-request-id"]
    assert allowed.status_code == 200
    assert [request.method for request in worker.seen].count("POST") == 1


async def test_errors_find_their_handler_as_under_starlette_status_code_first_then_class() -> None:
    async def teapot(request: Request) -> Response:
        raise HTTPException(418)

    async def lookup(request: Request) -> Response:
        raise KeyError("x")

    async def by_status(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("by status", status_code=418)

    async def by_class(request: Request, exc: Exception) -> Response:
        return PlainTextResponse(f"by class {type(exc).__name__}", status_code=500)

    routes = FastRoutes({"/teapot": teapot, "/lookup": lookup}, {418: by_status, LookupError: by_class})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=routes), base_url="http://hot") as client:
        teapot_answer = await client.post("/teapot")
        lookup_answer = await client.post("/lookup")
    assert (teapot_answer.status_code, teapot_answer.text) == (418, "by status")
    assert (lookup_answer.status_code, lookup_answer.text) == (500, "by class KeyError")


async def test_an_unexpected_error_on_another_route_is_a_500_that_keeps_the_request_id() -> None:
    # Starlette answers these from outside the user middleware, so the id is stamped by the handler itself.
    async def broken() -> None:
        raise RuntimeError("a bug")

    worker = ScriptedWorker(on_post=lambda r: httpx.Response(200, json={"choices": []}))
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (_, app):
        app.add_api_route("/v1/broken", broken)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            failed = await client.get("/v1/broken", headers={"x-request-id": "broken-1"})
    assert failed.status_code == 500 and failed.json()["error"]["message"] == "internal gateway error"
    assert failed.headers["x-request-id"] == "broken-1"


async def test_a_response_started_through_the_scope_whose_client_then_left_ends_quietly() -> None:
    from gateway.errors import ClientDisconnected
    from gateway.middleware.fast_routes import APP_SEND

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def started_then_gone(request: Request) -> Response:
        # As a stream opened from the worker's read callback: the start went out before the handler returned.
        await request.scope[APP_SEND]({"type": "http.response.start", "status": 200, "headers": []})
        raise ClientDisconnected()

    async def answer_499(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)

    scope: Scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    hot = FastRoutes({"/x": started_then_gone}, {ClientDisconnected: answer_499})
    await hot(scope, _no_body, send)
    assert [message["type"] for message in sent] == ["http.response.start"], "no second start for the 499"
    assert APP_SEND not in scope, "the scope does not keep the server's send (a reference cycle)"


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
