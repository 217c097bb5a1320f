"""Keys with scopes and limits through the gateway, on an in-memory worker: 401s that say nothing, models a key
may not see answered as absent, the max_tokens cap, priorities, RPM and TPM with OpenAI's headers and an exact
Retry-After, a store that is down, and per-key usage."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import free_port, until
from tests.unit.fakes import CHAT, MODEL, STREAM, ScriptedWorker, gateway_client, mock_client, settings_for, vllm_stream

SECRETS = {"team-a": "sk-a-secret", "team-b": "sk-b-secret", "ops": "sk-ops-secret"}


def keys_yaml(team_a: dict[str, Any]) -> str:
    entries = [
        {"name": "team-a", "sha256": _digest("team-a"), "models": ["demo*"], **team_a},
        {"name": "team-b", "sha256": _digest("team-b"), "models": ["other-*"], "priority": "low"},
        {"name": "ops", "sha256": _digest("ops"), "admin": True},
    ]
    return json.dumps({"defaults": {"priority": "normal"}, "keys": entries})  # JSON is YAML


def _digest(name: str) -> str:
    return hashlib.sha256(SECRETS[name].encode()).hexdigest()


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {SECRETS[name]}"}


def whole_answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"id": "x", "object": "chat.completion", "choices": [],
                                     "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml({"rpm": 2, "max_tokens": 50, "priority": "high"}))
    return path


@pytest.mark.anyio
async def test_keys_scope_models_cap_tokens_and_set_priority(keys_file: Path) -> None:
    worker = ScriptedWorker(on_post=whole_answer)
    async with gateway_client(settings_for(worker.url, keys_file=keys_file), mock_client(worker)) as (client, _):
        missing = await client.post("/v1/chat/completions", json=CHAT)
        wrong = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-nope"})
        assert missing.status_code == wrong.status_code == 401 and missing.content == wrong.content
        hidden = await client.post("/v1/chat/completions", json=CHAT, headers=auth("team-b"))
        absent = await client.post("/v1/chat/completions", json={**CHAT, "model": "no-such"}, headers=auth("ops"))
        assert hidden.status_code == absent.status_code == 404
        assert hidden.json()["error"]["message"] == f"The model '{MODEL}' does not exist"
        listed = (await client.get("/v1/models", headers=auth("team-b"))).json()["data"]
        assert listed == [], "a key sees only the models it may use"
        over = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 51}, headers=auth("team-a"))
        assert over.status_code == 400 and "cap of 50" in over.json()["error"]["message"]
        assert not worker.seen, "nothing refused reached the worker"
        ok = await client.post("/v1/chat/completions", json={**CHAT, "priority": 9}, headers=auth("team-a"))
        assert ok.status_code == 200
        sent = json.loads(worker.seen[-1].content)
        assert sent["max_tokens"] == 50 and sent["priority"] == -1, "capped, and the key's class, not the client's"
        assert (await client.get("/admin/workers", headers=auth("team-a"))).status_code == 403
        assert (await client.get("/admin/workers", headers=auth("ops"))).status_code == 200


@pytest.mark.anyio
async def test_rpm_answers_openai_headers_then_a_429_with_retry_after_and_counts_usage(keys_file: Path) -> None:
    worker = ScriptedWorker(on_post=whole_answer)
    async with gateway_client(settings_for(worker.url, keys_file=keys_file), mock_client(worker)) as (client, _):
        answers = [await client.post("/v1/chat/completions", json=CHAT, headers=auth("team-a")) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0", "0"]
        assert all(a.headers["x-ratelimit-limit-requests"] == "2" for a in answers)
        refused = answers[2]
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert 0 < int(refused.headers["retry-after-ms"]) <= 60_000
        assert len(worker.seen) == 2, "a key over its limit never reaches a worker"
        usage = await _usage_once_settled(client, "team-a", output_tokens=6)
        assert usage == {"requests": 2, "prompt_tokens": 14, "output_tokens": 6, "refused": 1}
        metrics = (await client.get("/metrics")).text
        assert 'specgate_key_requests_total{key="team-a",status="200"} 2.0' in metrics
        assert 'specgate_key_rate_limited_total{key="team-a",reason="requests"} 1.0' in metrics
        assert "sk-a-secret" not in metrics and _digest("team-a") not in metrics


@pytest.mark.anyio
async def test_tpm_counts_streamed_output_and_refuses_once_the_window_is_spent(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml({"tpm": 60}))
    events = b"".join(vllm_stream([10] * 4))  # 40 output tokens, 5 prompt tokens
    worker = ScriptedWorker(on_post=lambda request: httpx.Response(200, content=events))
    async with gateway_client(settings_for(worker.url, keys_file=path), mock_client(worker)) as (client, _):
        first = await client.post("/v1/chat/completions", json=STREAM, headers=auth("team-a"))
        assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "60"
        assert (await _usage_once_settled(client, "team-a", output_tokens=40))["prompt_tokens"] == 5
        second = await client.post("/v1/chat/completions", json=STREAM, headers=auth("team-a"))
        assert second.status_code == 200, "45 of 60 used: a prompt of about 5 fits"
        await _usage_once_settled(client, "team-a", output_tokens=80)
        third = await client.post("/v1/chat/completions", json=STREAM, headers=auth("team-a"))
        assert third.status_code == 429 and "(TPM)" in third.json()["error"]["message"]
        assert len(worker.seen) == 2


async def _usage_once_settled(client: httpx.AsyncClient, key: str, output_tokens: int) -> dict[str, int]:
    """The key's usage once its requests' output is counted (a request is settled in a task after its answer)."""
    usage: dict[str, int] = {}
    for _ in range(200):
        usage = (await client.get("/admin/usage", headers=auth("ops"))).json()["keys"].get(key, {})
        if usage.get("output_tokens") == output_tokens:
            return usage
        await asyncio.sleep(0.01)
    raise AssertionError(f"usage never counted {output_tokens} output tokens: {usage}")


@pytest.mark.anyio
@pytest.mark.parametrize(("fail_open", "status"), [(True, 200), (False, 429)])
async def test_a_store_that_is_down_is_a_documented_choice_never_a_5xx(keys_file: Path, fail_open: bool,
                                                                     status: int) -> None:
    worker = ScriptedWorker(on_post=whole_answer)
    settings = settings_for(worker.url, keys_file=keys_file, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                            limits_fail_open=fail_open)
    async with gateway_client(settings, mock_client(worker)) as (client, _):
        answer = await asyncio.wait_for(
            client.post("/v1/chat/completions", json=CHAT, headers=auth("team-a")), timeout=5)
        assert answer.status_code == status
        if not fail_open:
            assert answer.json()["error"]["code"] == "limits_unavailable"
        assert "specgate_limit_store_errors_total 1.0" in (await client.get("/metrics")).text
        usage = await client.get("/admin/usage", headers=auth("ops"))
        assert usage.status_code == 503 and usage.json()["error"]["code"] == "usage_unavailable"


@pytest.mark.anyio
async def test_the_old_api_keys_setting_still_works_as_keys_without_limits() -> None:
    worker = ScriptedWorker(on_post=whole_answer)
    async with gateway_client(settings_for(worker.url, api_keys="k1,k2"), mock_client(worker)) as (client, _):
        for key in ("k1", "k2"):
            answer = await client.post("/v1/chat/completions", json={**CHAT, "priority": 3},
                                       headers={"authorization": f"Bearer {key}"})
            assert answer.status_code == 200 and "x-ratelimit-limit-requests" not in answer.headers
        assert json.loads(worker.seen[-1].content)["priority"] == 3, "old keys passed the client's priority"
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 401
        assert (await client.get("/admin/workers", headers={"authorization": "Bearer k1"})).status_code == 200


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def test_a_malformed_keys_file_stops_the_gateway_naming_the_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    broken = tmp_path / "keys.yaml"
    broken.write_text("keys:\n  - name: team-a\n    sha256: " + _digest("team-a") + "\n    rpm: lots\n")
    assert main(["gateway", "--workers", "http://127.0.0.1:9", "--keys-file", str(broken)]) == 2
    assert "keys.yaml line 4" in capsys.readouterr().err


@pytest.mark.anyio
async def test_an_edited_keys_file_takes_effect_without_a_restart(keys_file: Path) -> None:
    worker = ScriptedWorker(on_post=whole_answer)
    async with gateway_client(settings_for(worker.url, keys_file=keys_file), mock_client(worker)) as (client, _):
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth("team-b"))).status_code == 404
        _write(keys_file, keys_yaml({"rpm": 2}).replace('"other-*"', '"demo*"'))
        for _ in range(500):  # the file is polled about once a second
            answer = await client.post("/v1/chat/completions", json=CHAT, headers=auth("team-b"))
            if answer.status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert answer.status_code == 200, "team-b may use demo now"
        _write(keys_file, "keys: [broken")
        for _ in range(500):
            if "specgate_keys_reload_failing 1.0" in (await client.get("/metrics")).text:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the broken file was never noticed")
        answer = await client.post("/v1/chat/completions", json=CHAT, headers=auth("team-b"))
        assert answer.status_code == 200, "a broken edit keeps the keys in force"


@pytest.mark.anyio
async def test_a_long_stream_is_charged_as_it_goes_and_exactly_once_in_total() -> None:
    import time

    from prometheus_client import CollectorRegistry

    from gateway.observability.record import RequestRecord
    from gateway.schemas import validate_call
    from gateway.tenants.keys_file import parse_keys
    from gateway.tenants.limiter import TenantLimiter
    from gateway.tenants.metrics import TenantMetrics
    from gateway.tenants.store.memory import MemoryLimitStore

    tenant = parse_keys(keys_yaml({"tpm": 1000}), "keys").lookup(SECRETS["team-a"].encode())
    assert tenant is not None
    store = MemoryLimitStore()
    limiter = TenantLimiter(store, TenantMetrics(CollectorRegistry()), fail_open=True, lease_s=60, clock=time.time)
    record = RequestRecord(request_id="r", model=MODEL, endpoint="chat", stream=True, received_at=0.0)
    grant = await limiter.admit(tenant, validate_call("chat", dict(CHAT)), record)
    record.output_tokens = 10
    await limiter.charge_open()
    assert (await store.usage(0, 4e9))["team-a"].output_tokens == 0, "a young stream waits for its second round"
    await limiter.charge_open()
    assert (await store.usage(0, 4e9))["team-a"].output_tokens == 10, "charged while it streams"
    record.output_tokens, record.prompt_tokens = 25, 7
    limiter.finish(grant, record)  # settled in a task of its own
    assert await until(lambda: store_usage_now(store) == (25, 7)), "the rest at the end, nothing twice"
    await limiter.aclose()


def store_usage_now(store: Any) -> tuple[int, int] | None:
    """(output, prompt) tokens of team-a in an in-process store, read synchronously (it never awaits)."""
    coroutine = store.usage(0, 4e9)
    try:
        coroutine.send(None)
    except StopIteration as done:
        usage = done.value.get("team-a")
        return None if usage is None else (usage.output_tokens, usage.prompt_tokens)
    raise AssertionError("the in-process store awaited")
