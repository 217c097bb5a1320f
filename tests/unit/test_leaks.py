"""A request gives back what it holds on every path: admission slots, in-flight counts, worker slots."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.services import Services
from gateway.streaming import usage as relay_module
from tests.unit.fakes import (
    CHAT,
    MODEL,
    STREAM,
    ScriptedWorker,
    gateway_client,
    mock_client,
    settings_for,
    vllm_stream,
)

pytestmark = pytest.mark.anyio


def _nested(depth: int) -> Any:
    """`depth` levels of objects, the outermost included."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


async def _one_event_a_read(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _streaming_worker() -> ScriptedWorker:
    def answer(request: httpx.Request) -> httpx.Response:
        if b'"stream":true' in request.content:
            return httpx.Response(200, content=_one_event_a_read(vllm_stream([1, 1, 1])))
        return httpx.Response(200, content=(
            b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
        ))

    return ScriptedWorker(on_post=answer)


def _services(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


async def _nothing_held(client: httpx.AsyncClient, app: FastAPI) -> None:
    services = _services(app)
    assert services.admission.held == 0
    assert all(worker["in_flight"] == 0 for worker in services.pool.admin_view())
    metrics = (await client.get("/metrics")).text
    held = re.findall(r"^specgate_in_flight\{.*\} (\S+)$", metrics, re.MULTILINE)
    assert all(float(value) == 0 for value in held), held


@pytest.mark.parametrize("field", ["vllm_xargs", "response_format", "tools", "content"])
async def test_a_body_nested_past_the_limit_is_a_400_naming_it_and_holds_no_slot(field: str) -> None:
    worker = _streaming_worker()
    body: dict[str, Any] = {**CHAT}
    deep = _nested(300)
    if field == "content":
        body["messages"] = [{"role": "user", "content": [deep]}]
    elif field == "tools":
        body["tools"] = [deep]
    else:
        body[field] = deep
    async with gateway_client(settings_for(worker.url, max_concurrency=2), mock_client(worker)) as (client, app):
        for _ in range(4):  # more than the slots: a leaked one would make the last answers wait and fail
            answer = await client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert "64 levels" in error["message"] and error["code"] == "nesting_too_deep"
        assert worker.seen == []
        await _nothing_held(client, app)
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_nesting_within_the_limit_reaches_the_worker() -> None:
    worker = _streaming_worker()
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
        answer = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "vllm_xargs": _nested(62)})
    assert answer.status_code == 200, answer.text
    assert len(worker.seen) == 1


def _raise(*args: object, **kwargs: object) -> Any:
    raise RuntimeError("injected fault")


async def _araise(*args: object, **kwargs: object) -> Any:
    raise RuntimeError("injected fault")


def _patch_all(patch: pytest.MonkeyPatch, target: object, names: tuple[str, ...], fault: object) -> None:
    for name in names:
        patch.setattr(target, name, fault)


# Each stage of the request path made to raise something the gateway does not expect.
STAGE_FAULTS: dict[str, Callable[[Services, pytest.MonkeyPatch], None]] = {
    "validate": lambda s, mp: mp.setattr(s.pool, "knows_model", _raise),
    "admit": lambda s, mp: mp.setattr(s.admission, "acquire", _araise),
    "route": lambda s, mp: mp.setattr(s.dispatcher, "policy_for", _raise),
    "dispatch": lambda s, mp: mp.setattr(s.pool, "started", _raise),
    "upstream": lambda s, mp: _patch_all(mp, s.upstream, ("open_stream", "complete"), _araise),
    "drain": lambda s, mp: mp.setattr(s.drainer, "track", _raise),
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("stage", sorted(STAGE_FAULTS))
async def test_an_unexpected_fault_in_any_stage_is_a_500_envelope_and_leaks_nothing(
    stage: str, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = _streaming_worker()
    settings = settings_for(worker.url, max_concurrency=1, queue_timeout_s=0.5)
    async with gateway_client(settings, mock_client(worker)) as (client, app):
        with monkeypatch.context() as patch:
            STAGE_FAULTS[stage](_services(app), patch)
            for _ in range(3):  # past the one slot: a leaked slot would turn the next ones into 429s
                answer = await client.post("/v1/chat/completions", json=STREAM if stream else CHAT,
                                           headers={"x-request-id": "fault-1"})
                assert answer.status_code == 500, answer.text
                assert answer.json()["error"]["type"] == "internal_error"
                assert answer.headers["x-request-id"] == "fault-1"
        await _nothing_held(client, app)
        after = await client.post("/v1/chat/completions", json=STREAM if stream else CHAT)
        assert after.status_code == 200, after.text
        await _nothing_held(client, app)


async def test_a_relay_fault_after_the_first_byte_ends_the_stream_with_an_error_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = _streaming_worker()
    settings = settings_for(worker.url, max_concurrency=1, queue_timeout_s=0.5)
    async with gateway_client(settings, mock_client(worker)) as (client, app):
        with monkeypatch.context() as patch:
            original = relay_module.UsageFilter.tokens_in
            calls = [0]

            def fails_after_the_opening(self: relay_module.UsageFilter, *args: Any) -> int:
                calls[0] += 1
                if calls[0] > 2:  # the role chunk and the first token went out with the response's head
                    raise RuntimeError("injected fault")
                return original(self, *args)

            patch.setattr(relay_module.UsageFilter, "tokens_in", fails_after_the_opening)
            for _ in range(2):
                calls[0] = 0
                answer = await client.post("/v1/chat/completions", json=STREAM)
                assert answer.status_code == 200
                events = [e for e in answer.text.split("\n\n") if e.startswith("data:")]
                assert '"internal_error"' in events[-1] and "[DONE]" not in answer.text
        await _nothing_held(client, app)
        assert (await client.post("/v1/chat/completions", json=STREAM)).text.rstrip().endswith("[DONE]")


async def test_a_fault_in_accounting_still_answers_and_gives_the_slot_back(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = _streaming_worker()
    async with gateway_client(settings_for(worker.url, max_concurrency=1, queue_timeout_s=0.5),
                              mock_client(worker)) as (client, app):
        monkeypatch.setattr(_services(app).metrics, "record", _raise)
        for body in (STREAM, CHAT, STREAM, CHAT):
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        assert _services(app).admission.held == 0


async def test_ready_says_so_when_admission_is_saturated_and_nothing_completes() -> None:
    now = [0.0]
    worker = _streaming_worker()
    settings = settings_for(worker.url, max_concurrency=1, queue_timeout_s=5)
    async with gateway_client(settings, mock_client(worker), clock=lambda: now[0]) as (client, app):
        assert (await client.get("/ready")).status_code == 200
        ticket = await _services(app).admission.acquire()
        now[0] += 1
        assert (await client.get("/ready")).status_code == 200, "saturated for less than the queue timeout"
        now[0] += 5
        stalled = await client.get("/ready")
        assert stalled.status_code == 503 and "admission saturated" in stalled.text
        ticket.release()
        assert (await client.get("/ready")).status_code == 200
