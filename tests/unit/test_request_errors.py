"""What the gateway refuses itself, in the OpenAI error envelope: bad input, unknown model or path, size, keys."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.unit.envelopes import assert_envelope, gateway_post, never_called
from tests.unit.fakes import CHAT, MODEL, ScriptedWorker, gateway_client, mock_client, settings_for

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"\xff\xfe{}", None),
        ({"model": MODEL}, "messages"),
        ({**CHAT, "max_tokens": -1}, "max_tokens"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "n": 100000}, "n"),
        ({**CHAT, "top_logprobs": 99}, "top_logprobs"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"content": "no role"}]}, "messages"),
        ({**CHAT, "not_a_field": 1}, "not_a_field"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        (b'{"model": "demo", "messages": [{"role": "user", "content": "a\x00b"}]}', None),
    ],
)
async def test_invalid_input_is_a_400_and_never_reaches_a_worker(body: object, param: str | None) -> None:
    worker = ScriptedWorker(on_post=never_called)
    error = assert_envelope(await gateway_post(worker, body), 400, "invalid_request_error")
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/v1/chat/completions", {"messages": CHAT["messages"]}, "model", "Missing required parameter: 'model'"),
        ("/v1/completions", {"model": MODEL}, "prompt", "Missing required parameter: 'prompt'"),
        ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt", "Invalid value for 'prompt'"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"every": True}},
         "stream_options.every", "Unrecognized request argument supplied: stream_options.every"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "chat_template": "t"}, "chat_template",
         "Unrecognized request argument supplied: chat_template"),
    ],
)
async def test_each_endpoint_checks_its_own_fields(path: str, body: object, param: str, message: str) -> None:
    worker = ScriptedWorker(on_post=never_called)
    error = assert_envelope(await gateway_post(worker, body, path=path), 400, "invalid_request_error")
    assert error["param"] == param
    assert str(error["message"]).startswith(message)


async def test_vllm_extra_sampling_parameters_pass_through() -> None:
    worker = ScriptedWorker(on_post=lambda r: httpx.Response(200, json={"choices": [], "usage": {}}))
    extras = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 2,
              "chat_template_kwargs": {"enable_thinking": False}, "store": False, "priority": -1}
    response = await gateway_post(worker, {**CHAT, **extras})
    assert response.status_code == 200
    forwarded = json.loads(worker.seen[0].content)
    assert {key: forwarded[key] for key in extras} == extras


async def test_escaped_nul_is_valid_json_text_and_passes_through() -> None:
    worker = ScriptedWorker(on_post=lambda r: httpx.Response(200, json={"choices": [], "usage": {}}))
    response = await gateway_post(worker, {**CHAT, "messages": [{"role": "user", "content": "a\u0000b"}]})
    assert response.status_code == 200


async def test_unknown_model_is_a_404() -> None:
    worker = ScriptedWorker(on_post=never_called)
    error = assert_envelope(await gateway_post(worker, {**CHAT, "model": "gpt-17"}), 404)
    assert error["code"] == "model_not_found"


async def test_oversized_body_is_a_413() -> None:
    worker = ScriptedWorker(on_post=never_called)
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_envelope(await gateway_post(worker, huge, max_body_bytes=2048), 413)


async def test_unknown_path_and_wrong_method_use_the_envelope() -> None:
    worker = ScriptedWorker(on_post=never_called)
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
        missing = await client.get("/v1/nothing")
        wrong = await client.get("/v1/chat/completions")
    assert_envelope(missing, 404)
    assert_envelope(wrong, 405)


async def test_api_keys_are_required_when_configured() -> None:
    worker = ScriptedWorker(on_post=lambda r: httpx.Response(200, json={"choices": []}))
    settings = settings_for(worker.url, api_keys="key-one,key-two")
    async with gateway_client(settings, mock_client(worker)) as (client, _):
        missing = await client.post("/v1/chat/completions", json=CHAT)
        wrong = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer nope"})
        right = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer key-two"})
        health = await client.get("/health")
        admin = await client.get("/admin/workers")
        admin_with_key = await client.get("/admin/workers", headers={"authorization": "Bearer key-one"})
    assert_envelope(missing, 401, "authentication_error")
    assert_envelope(wrong, 401)
    assert_envelope(admin, 401)  # it lists worker addresses
    assert missing.headers["x-request-id"]
    assert right.status_code == 200 and admin_with_key.status_code == 200
    assert health.status_code == 200


async def test_metrics_can_be_kept_for_a_bearer_token() -> None:
    worker = ScriptedWorker()
    settings = settings_for(worker.url, metrics_token="scrape-secret", api_keys="client-key")
    async with gateway_client(settings, mock_client(worker)) as (client, _):
        missing = await client.get("/metrics")
        client_key = await client.get("/metrics", headers={"authorization": "Bearer client-key"})
        right = await client.get("/metrics", headers={"authorization": "Bearer scrape-secret"})
    assert_envelope(missing, 401, "authentication_error")
    assert_envelope(client_key, 401)  # an API key is not the scrape token
    assert right.status_code == 200 and "specgate_worker_healthy" in right.text


async def test_metrics_are_open_without_a_token() -> None:
    worker = ScriptedWorker()
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
        assert (await client.get("/metrics")).status_code == 200
