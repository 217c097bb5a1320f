"""Shadow traffic: the client's answer comes from the primary only; the shadow is measured, logged beside its
primary (greedy answers compared by hash), dropped when too many run, and never fails the primary."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from tests.unit.fakes import ScriptedWorker, chat_chunk, mock_client, settings_for, usage_chunk

ROUTE = {"routes": {"chat": {"targets": [{"model": "demo-v1", "weight": 1}],
                             "shadow": {"model": "demo-v3", "sample": 1.0}}}}
DONE = b"data: [DONE]\n\n"


def streaming(model: str, words: list[str]) -> ScriptedWorker:
    events = [chat_chunk("", 0, role="assistant")]
    events += [chat_chunk(word, index + 1) for index, word in enumerate(words)]
    events += [usage_chunk(len(words)), DONE]
    body = b"".join(events)
    return ScriptedWorker(url=f"http://{model}:1", models=[model],
                          on_post=lambda request: httpx.Response(200, content=body))


async def _logged(caplog: pytest.LogCaptureFixture, count: int) -> list[dict[str, object]]:
    for _ in range(300):
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "specgate.requests"]
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} request log lines, got {len(lines)}")


async def _run(tmp_path: Path, shadow_words: list[str], caplog: pytest.LogCaptureFixture,
               **overrides: object) -> tuple[httpx.Response, list[dict[str, object]], ScriptedWorker]:
    routes = tmp_path / "routes.yaml"
    routes.write_text(json.dumps(ROUTE))
    primary, shadow = streaming("demo-v1", ["The", " answer"]), streaming("demo-v3", shadow_words)
    settings = settings_for(primary.url, shadow.url, routes_file=routes, **overrides)
    app = create_app(settings, worker_client=mock_client(primary, shadow))
    caplog.set_level(logging.INFO, logger="specgate.requests")
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        answer = await client.post("/v1/chat/completions", json={
            "model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True, "temperature": 0})
        expected = 2 if overrides.get("shadow_max_in_flight", 1) else 1
        lines = await _logged(caplog, expected)
        metrics = (await client.get("/metrics")).text
    return answer, [*lines, {"metrics": metrics}], shadow


@pytest.mark.anyio
async def test_the_shadow_is_measured_and_compared_but_never_answers(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    answer, lines, shadow = await _run(tmp_path, ["The", " answer"], caplog)
    assert answer.headers["x-specgate-model"] == "demo-v1" and "The" in answer.text
    primary = next(line for line in lines if line.get("shadow_of") is None and "request_id" in line)
    copy = next(line for line in lines if line.get("shadow_of"))
    assert copy["shadow_of"] == primary["request_id"] and copy["served_model"] == "demo-v3"
    assert copy["output_tokens"] == 2 and copy["status"] == "200"
    assert primary["output_sha256"] == copy["output_sha256"] is not None, "greedy answers agree"
    sent = json.loads(shadow.seen[0].content)
    assert sent["model"] == "demo-v3" and sent["priority"] == 100, "the shadow runs behind every client request"


@pytest.mark.anyio
async def test_disagreeing_and_dropped_shadows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, lines, _ = await _run(tmp_path, ["Another", " text"], caplog)
    primary = next(line for line in lines if line.get("shadow_of") is None and "request_id" in line)
    copy = next(line for line in lines if line.get("shadow_of"))
    assert primary["output_sha256"] != copy["output_sha256"]
    caplog.clear()
    answer, lines, shadow = await _run(tmp_path, ["x"], caplog, shadow_max_in_flight=0)
    assert answer.status_code == 200 and not shadow.seen
    assert 'specgate_shadow_requests_total{model="demo-v3",outcome="dropped",route="chat"} 1.0' in lines[-1]["metrics"]


@pytest.mark.anyio
async def test_a_failing_shadow_never_touches_the_primary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(json.dumps(ROUTE))
    primary = streaming("demo-v1", ["ok"])
    broken = ScriptedWorker(url="http://demo-v3:1", models=["demo-v3"], on_post=lambda r: httpx.Response(500))
    settings = settings_for(primary.url, broken.url, routes_file=routes)
    app = create_app(settings, worker_client=mock_client(primary, broken))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        for _ in range(3):
            answer = await client.post("/v1/chat/completions", json={
                "model": "chat", "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200 and answer.headers["x-specgate-model"] == "demo-v1"
        for _ in range(300):
            if 'outcome="failed"' in (await client.get("/metrics")).text:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the shadow's failure was not counted")
