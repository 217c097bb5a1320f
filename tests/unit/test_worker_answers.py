"""Worker answers the relay does not expect (token counts that are not counts, events of unknown shapes): relayed
as they came, through real uvicorn and the default worker client, and never a crash."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.unit.fakes import (
    CHAT,
    DONE,
    MODEL,
    STREAM,
    ScriptedWorker,
    SlowWorker,
    chat_chunk,
    gateway_client,
    gateway_over,
    mock_client,
    requests_finish,
    settings_for,
)

BAD_USAGE = [{"prompt_tokens": "five", "completion_tokens": "x"}, {"prompt_tokens": -3, "completion_tokens": -1}]


def test_token_counts_that_are_not_counts_are_ignored_and_the_stream_relayed_whole() -> None:
    events = [chat_chunk("", None, role="assistant")]
    events += [chat_chunk(f"t{index}", None, usage=BAD_USAGE[index % 2]) for index in range(6)]
    events.append(DONE)
    worker = SlowWorker(events, gap_s=0.01)
    with_usage = {**STREAM, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with gateway_over(worker) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        streamed = client.post("/v1/chat/completions", json=with_usage)
        assert requests_finish(client)
        metrics = client.get("/metrics").text
    assert streamed.status_code == 200
    assert streamed.content == b"".join(events), "relayed unchanged, to [DONE]"
    finished = [line for line in metrics.splitlines() if line.startswith("specgate_requests_total{")]
    assert any('status="200"' in line for line in finished), finished


@pytest.mark.anyio
async def test_a_whole_answer_with_token_counts_that_are_not_counts_is_returned_as_it_came() -> None:
    for usage in BAD_USAGE:
        answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}], "usage": usage}
        worker = ScriptedWorker(on_post=lambda request, answer=answer: httpx.Response(200, json=answer))
        async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
            reply = await client.post("/v1/chat/completions", json=CHAT)
            metrics = (await client.get("/metrics")).text
        assert reply.status_code == 200 and reply.json() == answer
        labels = f'{{model="{MODEL}",worker="{worker.url}"}}'
        assert f"specgate_output_tokens_total{labels} 0.0" in metrics, "no count was taken from it"
        assert f"specgate_prompt_tokens_total{labels} 0.0" in metrics


def test_events_of_shapes_the_relay_does_not_know_are_relayed_unchanged() -> None:
    odd = [{"choices": 5}, {"choices": ["x"]}, {"choices": [{"delta": "x"}]}, {"choices": [{"index": 0}]}]
    events = [chat_chunk("", None, role="assistant")]
    events += [b"data: " + json.dumps({"id": "c", **payload}).encode() + b"\n\n" for payload in odd * 2]
    events.append(DONE)
    worker = SlowWorker(events, gap_s=0.01)
    with gateway_over(worker) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        streamed = client.post("/v1/chat/completions", json=STREAM)
        assert requests_finish(client)
    assert streamed.status_code == 200
    assert streamed.content == b"".join(events), "relayed unchanged, to [DONE]"
