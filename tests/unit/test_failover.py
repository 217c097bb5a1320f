"""Mid-stream failover: a worker that fails after the first byte, and the client's one stream goes on from another
worker: no token twice, none lost, one id, usage as one request's, one [DONE]."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.unit.fakes import (
    DONE,
    MODEL,
    ScriptedWorker,
    chat_chunk,
    data_events,
    gateway_client,
    mock_client,
    settings_for,
    usage_chunk,
)

WORDS = [f" t{i}" for i in range(8)]


def role_chunk(stream_id: str, prompt_tokens: int) -> bytes:
    """vLLM's first chunk of a chat stream: the role, no text."""
    payload = {"id": stream_id, "object": "chat.completion.chunk", "model": MODEL,
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _events(words: list[str], first: int, stream_id: str) -> list[bytes]:
    events = [role_chunk(stream_id, 5)]
    for index, word in enumerate(words):
        last = first + index == len(WORDS) - 1
        events.append(chat_chunk(word, index + 1, prompt_tokens=5, id=stream_id,
                                 finish_reason="length" if last else None))
    return events


def dying_after(count: int) -> ScriptedWorker:
    async def body() -> AsyncIterator[bytes]:
        for event in _events(WORDS[:count], 0, "chatcmpl-first"):
            yield event
        yield b'data: {"id": "chatcmpl-first", "choi'  # half an event, then the connection dies
        raise httpx.ReadError("connection reset by peer")

    return ScriptedWorker(url="http://dying:1", on_post=lambda request: httpx.Response(200, content=body()))


def continuing(seen: list[dict[str, object]]) -> ScriptedWorker:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        already = body["messages"][-1]["content"]
        done = already.count(" t")
        rest = WORDS[done:][: body["max_tokens"]]
        prompt = 5 + done  # the worker counts the text so far as prompt
        events = [role_chunk("chatcmpl-second", prompt)]
        for index, word in enumerate(rest):
            last = index == len(rest) - 1
            events.append(chat_chunk(word, index + 1, prompt_tokens=prompt, id="chatcmpl-second",
                                     finish_reason="length" if last else None))
        events += [usage_chunk(len(rest), prompt_tokens=prompt), DONE]
        return httpx.Response(200, content=b"".join(events))

    return ScriptedWorker(url="http://healthy:1", on_post=answer)


@pytest.mark.anyio
async def test_a_stream_whose_worker_dies_goes_on_from_another_worker() -> None:
    continuations: list[dict[str, object]] = []
    dying, healthy = dying_after(3), continuing(continuations)
    settings = settings_for(dying.url, healthy.url, routing="round_robin")
    request = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "stream": True,
               "max_tokens": 8, "temperature": 0, "seed": 7, "stream_options": {"include_usage": True}}
    async with gateway_client(settings, mock_client(dying, healthy)) as (client, _):
        answers = []
        for _ in range(2):  # round robin: one of them starts on the dying worker
            answers.append(await client.post("/v1/chat/completions", json=request))
        metrics = (await client.get("/metrics")).text
    resumed = [c for c in continuations if c["messages"][-1]["role"] == "assistant"]
    assert resumed, "a request started on the dying worker"
    continuation = resumed[0]
    assert continuation["messages"][-1] == {"role": "assistant", "content": "".join(WORDS[:3])}
    assert continuation["continue_final_message"] is True and continuation["add_generation_prompt"] is False
    assert continuation["max_tokens"] == 5 and continuation["seed"] == 7 and continuation["temperature"] == 0
    for answer in answers:
        assert answer.status_code == 200
        events = [json.loads(e[6:]) for e in data_events(answer.text) if e != "data: [DONE]"]
        assert answer.text.count("data: [DONE]") == 1
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert text == "".join(WORDS), "no token twice, none lost"
        assert len({e["id"] for e in events}) == 1, "one stream, one id"
        roles = [e for e in events if e["choices"] and "role" in e["choices"][0]["delta"]]
        assert len(roles) == 1
        usage = events[-1]["usage"]
        assert usage == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
        assert "error" not in answer.text
    assert f'specgate_stream_migrations_total{{model="demo",outcome="resumed"}} {len(resumed)}.0' in metrics


@pytest.mark.anyio
async def test_without_another_worker_the_stream_ends_with_one_error_event() -> None:
    dying = dying_after(2)
    async with gateway_client(settings_for(dying.url), mock_client(dying)) as (client, _):
        answer = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "count"}], "stream": True, "max_tokens": 8})
        metrics = (await client.get("/metrics")).text
    events = data_events(answer.text)
    assert '"error"' in events[-1] and "data: [DONE]" not in answer.text
    assert 'outcome="no_worker"' in metrics


@pytest.mark.anyio
async def test_failover_off_ends_the_stream_as_before() -> None:
    continuations: list[dict[str, object]] = []
    dying, healthy = dying_after(2), continuing(continuations)
    settings = settings_for(dying.url, healthy.url, routing="round_robin", max_migrations=0)
    async with gateway_client(settings, mock_client(dying, healthy)) as (client, _):
        texts = [(await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "count"}], "stream": True,
            "max_tokens": 8})).text for _ in range(2)]
    assert sum('"error"' in text for text in texts) == 1
    assert all(c["messages"][-1]["role"] == "user" for c in continuations)


@pytest.mark.anyio
async def test_a_completion_is_continued_with_its_text_appended_to_the_prompt() -> None:
    def completion_chunk(text: str, tokens: int, stream_id: str, prompt_tokens: int) -> bytes:
        payload = {"id": stream_id, "object": "text_completion", "model": MODEL,
                   "choices": [{"index": 0, "text": text, "finish_reason": None}],
                   "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                             "total_tokens": prompt_tokens + tokens}}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    async def dying_body() -> AsyncIterator[bytes]:
        for index in range(4):
            yield completion_chunk(WORDS[index], index + 1, "cmpl-first", 3)
        raise httpx.ReadError("connection reset by peer")

    prompts: list[str] = []

    def continue_it(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        prompts.append(body["prompt"])
        done = body["prompt"].count(" t")
        rest = WORDS[done:done + body["max_tokens"]]
        events = [completion_chunk(word, i + 1, "cmpl-second", 3 + done) for i, word in enumerate(rest)]
        return httpx.Response(200, content=b"".join([*events, DONE]))

    dying = ScriptedWorker(url="http://dying:1", on_post=lambda request: httpx.Response(200, content=dying_body()))
    healthy = ScriptedWorker(url="http://healthy:1", on_post=continue_it)
    async with gateway_client(settings_for(dying.url, healthy.url, routing="round_robin"),
                              mock_client(dying, healthy)) as (client, _):
        texts = []
        for _ in range(2):
            answer = await client.post("/v1/completions", json={"model": MODEL, "prompt": "count:", "stream": True,
                                                                "max_tokens": 8})
            events = [json.loads(e[6:]) for e in data_events(answer.text) if e != "data: [DONE]"]
            texts.append("".join(e["choices"][0]["text"] for e in events if e["choices"]))
            assert {e["id"] for e in events} == {events[0]["id"]}
    assert texts == ["".join(WORDS)] * 2
    assert "count:" + "".join(WORDS[:4]) in prompts, "the text so far appended to the prompt"


def test_the_sent_log_keeps_text_not_events_once_a_stream_is_long() -> None:
    from gateway.streaming.sent_log import FOLD_BYTES, SentLog

    log = SentLog()
    events = [chat_chunk(f" w{i}", i + 1, id="chatcmpl-x") for i in range(2000)]
    for event in events:
        log.append(event)
    assert sum(len(e) for e in events) > 4 * FOLD_BYTES
    assert log._pending_size <= FOLD_BYTES, "folded into text as it went"
    assert log.text() == "".join(f" w{i}" for i in range(2000))
    assert log.stream_id == "chatcmpl-x" and not log.tool_calls
