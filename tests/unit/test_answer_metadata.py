"""Every answer says which version and worker served it; whole answers carry the gateway's own timing."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.fakes import CHAT, MODEL, STREAM, ScriptedWorker, gateway_client, mock_client, settings_for, vllm_stream


@pytest.mark.anyio
@pytest.mark.parametrize("streamed", [False, True])
async def test_the_serving_worker_and_version_are_in_the_headers_after_a_retry(streamed: bool) -> None:
    broken = ScriptedWorker(url="http://broken:1", on_post=lambda request: httpx.Response(500))
    events = b"".join(vllm_stream([1, 1]))
    good = ScriptedWorker(url="http://good:1", on_post=lambda request: (
        httpx.Response(200, content=events) if streamed else httpx.Response(200, json={"choices": []})))
    settings = settings_for(broken.url, good.url, routing="round_robin")
    async with gateway_client(settings, mock_client(broken, good)) as (client, _):
        for _ in range(2):  # round robin: one of the two starts on the broken worker and is retried
            answer = await client.post("/v1/chat/completions", json=STREAM if streamed else CHAT)
            assert answer.status_code == 200
            assert answer.headers["x-specgate-worker"] == good.url
            assert answer.headers["x-specgate-model"] == MODEL
        assert broken.seen, "a request was retried off the broken worker"
        timing = answer.headers.get("server-timing")
        if streamed:
            assert timing is None
        else:
            names = [part.split(";")[0] for part in timing.split(", ")]
            assert names == ["queue", "upstream", "total"]
            durations = [float(part.split("dur=")[1]) for part in timing.split(", ")]
            assert all(d >= 0 for d in durations) and durations[2] >= durations[1]
