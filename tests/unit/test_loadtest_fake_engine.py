"""The fake vLLM worker: vLLM's stream shape, usage semantics, faults and disconnects, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from loadtest.fake_config import FakeEngineConfig, FaultConfig
from loadtest.fake_engine import FakeEngine, run_in_thread

USAGE = {"include_usage": True, "continuous_usage_stats": True}


def chat(max_tokens: int | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def events_of(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), "every event ends with the blank-line separator"
    return [event for event in body.split(b"\n\n") if event]


def payloads(body: bytes) -> list[dict[str, Any] | str]:
    out: list[dict[str, Any] | str] = []
    for event in events_of(body):
        assert event.startswith(b"data: ")
        data = event[len(b"data: "):]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


@pytest.fixture(scope="module")
def shared() -> Iterator[str]:
    """A fast engine for tests that only look at responses (not at counters)."""
    with run_in_thread(FakeEngineConfig(ttft_s=0.0, gap_s=0.0, output_len=6)) as url:
        yield url


def test_chat_stream_has_vllms_shape_with_k_tokens_per_event() -> None:
    engine = FakeEngine(FakeEngineConfig(ttft_s=0.0, gap_s=0.001, tokens_per_chunk=3))
    with run_in_thread(engine) as url:
        body = httpx.post(url + "/v1/chat/completions",
                          json=chat(10, stream=True, ignore_eos=True, stream_options=USAGE)).content
    items = payloads(body)
    role, *content, usage_only, done = items
    assert done == "[DONE]"
    assert isinstance(role, dict) and role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # Prefill yields one token, then each decode step k=3: 1 + 3 + 3 + 3.
    texts = [c["choices"][0]["delta"]["content"] for c in content if isinstance(c, dict)]
    assert [t.count("tok") for t in texts] == [1, 3, 3, 3]
    cumulative = [c["usage"]["completion_tokens"] for c in [role, *content] if isinstance(c, dict)]
    assert cumulative == [0, 1, 4, 7, 10]
    assert all(c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
               for c in content if isinstance(c, dict))
    reasons = [c["choices"][0]["finish_reason"] for c in content if isinstance(c, dict)]
    assert reasons == [None, None, None, "length"]
    assert isinstance(usage_only, dict) and usage_only["choices"] == []
    assert usage_only["usage"]["completion_tokens"] == 10
    assert engine.stats.events_total == 5 and engine.stats.generation_tokens_total == 10
    assert engine.stats.spec_accepted_tokens_total == 6 and engine.stats.spec_drafts_total == 3


def test_usage_only_when_asked(shared: str) -> None:
    plain = payloads(httpx.post(shared + "/v1/completions",
                                json={"model": "demo", "prompt": "hi", "max_tokens": 50, "stream": True}).content)
    assert all("usage" not in p for p in plain if isinstance(p, dict))
    # The model's natural length (6) is under max_tokens: it stops.
    assert [p["choices"][0]["finish_reason"] for p in plain if isinstance(p, dict)][-1] == "stop"
    assert sum(p["choices"][0]["text"].count("tok") for p in plain if isinstance(p, dict)) == 6

    final_only = payloads(httpx.post(shared + "/v1/completions", json={
        "model": "demo", "prompt": "hi", "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}}).content)
    with_usage = [p for p in final_only if isinstance(p, dict) and "usage" in p]
    assert len(with_usage) == 1 and with_usage[0]["choices"] == []
    assert with_usage[0]["usage"]["completion_tokens"] == 4
    assert final_only[-1] == "[DONE]"


def test_non_streaming_responses_carry_usage(shared: str) -> None:
    reply = httpx.post(shared + "/v1/chat/completions", json=chat(3)).json()
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3
    text = httpx.post(shared + "/v1/completions", json={"model": "demo", "prompt": [1, 2, 3, 4, 5]}).json()
    assert text["usage"] == {"prompt_tokens": 5, "total_tokens": 11, "completion_tokens": 6,
                             "prompt_tokens_details": None}


def test_models_health_and_vllm_metric_names() -> None:
    with run_in_thread(FakeEngineConfig(model="other-model", tokens_per_chunk=2, ttft_s=0, gap_s=0)) as url:
        assert httpx.get(url + "/health").status_code == 200
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["other-model"]
        httpx.post(url + "/v1/completions", json={"prompt": "x" * 40, "max_tokens": 5, "stream": True})
        metrics = httpx.get(url + "/metrics").text
    labels = '{model_name="other-model",engine="0"}'
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total"):
        assert f"{name}{labels} " in metrics, name
    assert f"vllm:prefix_cache_queries_total{labels} 10.0" in metrics  # 40 chars at 4 chars per token
    assert f"vllm:generation_tokens_total{labels} 5.0" in metrics


@pytest.mark.parametrize(("body", "status"), [
    (b"{not json", 400),
    (json.dumps({"model": "demo", "messages": []}).encode(), 400),
    (json.dumps(chat(0)).encode(), 400),
    (json.dumps(chat(stream_options={"include_usage": True})).encode(), 400),
    (json.dumps({**chat(), "model": "nope"}).encode(), 404),
    (json.dumps(chat(100_000)).encode(), 400),
])
def test_bad_input_gets_openai_error_envelope(shared: str, body: bytes, status: int) -> None:
    response = httpx.post(shared + "/v1/chat/completions", content=body)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_status_faults_by_header_and_body_field() -> None:
    engine = FakeEngine(FakeEngineConfig(ttft_s=0, gap_s=0))
    with run_in_thread(engine) as url:
        by_header = httpx.post(url + "/v1/chat/completions", json=chat(stream=True), headers={"x-fake-fault": "503"})
        by_field = httpx.post(url + "/v1/chat/completions", json=chat(fake_fault="500"))
        by_xargs = httpx.post(url + "/v1/chat/completions", json=chat(vllm_xargs={"fake_fault": "429"}))
        normal = httpx.post(url + "/v1/chat/completions", json=chat())
    assert by_header.status_code == 503 and by_header.headers["retry-after"] == "1"
    assert by_field.status_code == 500 and by_field.json()["error"]["code"] == 500
    assert by_xargs.status_code == 429 and "retry-after" in by_xargs.headers
    assert normal.status_code == 200
    assert engine.stats.faults_total == {"503": 1, "500": 1, "429": 1}
    assert engine.stats.running == 0


def test_fault_probabilities_are_drawn_per_request() -> None:
    faults = FaultConfig.from_mapping({"500": 0.5})
    engine = FakeEngine(FakeEngineConfig(ttft_s=0, gap_s=0, output_len=1, faults=faults, seed=7))
    with run_in_thread(engine) as url, httpx.Client(base_url=url) as client:
        statuses = [client.post("/v1/completions", json={"prompt": "x"}).status_code for _ in range(60)]
    assert set(statuses) == {200, 500}
    assert statuses.count(500) == engine.stats.faults_total["500"]
    assert 10 <= statuses.count(500) <= 50


def test_reset_mid_stream_after_n_events() -> None:
    engine = FakeEngine(FakeEngineConfig(ttft_s=0, gap_s=0.002, output_len=50))
    received: list[bytes] = []
    with run_in_thread(engine) as url, pytest.raises(httpx.TransportError):  # noqa: SIM117
        with httpx.stream("POST", url + "/v1/completions", headers={"x-fake-fault": "reset:3"},
                          json={"prompt": "x", "stream": True}) as response:
            for chunk in response.iter_raw():
                received.append(chunk)
    assert len(events_of(b"".join(received))) == 3
    assert engine.stats.running == 0 and engine.stats.faults_total == {"reset": 1}


def test_stalled_stream_counts_as_running_until_the_client_leaves() -> None:
    engine = FakeEngine(FakeEngineConfig(ttft_s=0, gap_s=0, output_len=50))
    with run_in_thread(engine) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=chat(stream=True),
                          headers={"x-fake-fault": "stall:2"}) as response:
            chunks = response.iter_raw()
            seen = b""
            while seen.count(b"\n\n") < 2:
                seen += next(chunks)
            assert wait_until(lambda: engine.stats.running == 1)
            assert engine.stats.faults_total == {"stall": 1}
        assert wait_until(lambda: engine.stats.running == 0), "stalled request still running after disconnect"
        assert engine.stats.aborted_total == 1
        metrics = httpx.get(url + "/metrics").text
    assert 'vllm:num_requests_running{model_name="demo",engine="0"} 0.0' in metrics
    assert seen.count(b"\n\n") == 2


def test_disconnect_mid_stream_aborts_generation() -> None:
    engine = FakeEngine(FakeEngineConfig(ttft_s=0, gap_s=0.005, output_len=1000))
    with run_in_thread(engine) as url:
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "x", "stream": True}) as response:
            next(response.iter_raw())
        assert wait_until(lambda: engine.stats.running == 0)
        produced = engine.stats.generation_tokens_total
        time.sleep(0.05)  # not synchronisation: checks that nothing more is generated after the abort
        assert engine.stats.generation_tokens_total == produced < 1000
        assert engine.stats.aborted_total == 1


def test_requests_beyond_max_running_wait() -> None:
    engine = FakeEngine(FakeEngineConfig(ttft_s=0, gap_s=0.01, output_len=10, max_running=1))

    async def scenario(url: str) -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            body = {"prompt": "x", "stream": True}
            first = asyncio.create_task(client.post("/v1/completions", json=body))
            second = asyncio.create_task(client.post("/v1/completions", json=body))
            # The counters live in the server's thread: poll them with a deadline from a worker thread.
            await asyncio.to_thread(wait_until, lambda: engine.stats.waiting == 1)
            seen = (engine.stats.running, engine.stats.waiting)
            await asyncio.gather(first, second)
            return seen

    with run_in_thread(engine) as url:
        assert asyncio.run(scenario(url)) == (1, 1)
    assert engine.stats.running == 0 and engine.stats.waiting == 0
