"""Per-request speculative decoding read from the worker's final answer: exported, logged, never shown unasked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.profiles import find_profile, render
from tests.unit.fakes import (
    CHAT,
    DONE,
    MODEL,
    STREAM,
    ScriptedWorker,
    chat_chunk,
    gateway_client,
    mock_client,
    settings_for,
    usage_chunk,
)

pytestmark = pytest.mark.anyio

REPORT = {"speculative_decoding": {
    "mean_acceptance_length": 2.5, "draft_acceptance_rate": 0.5, "acceptance_histogram": [1, 0, 1, 0],
    "num_spec_steps": 4, "num_accepted_draft_tokens": 6, "num_draft_tokens": 12, "num_spec_tokens": 3,
}}


def final_usage_with(metrics: Any) -> bytes:
    payload = json.loads(usage_chunk(10)[6:])
    payload["metrics"] = metrics
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _streaming_worker(metrics: Any) -> ScriptedWorker:
    events = [chat_chunk("", 0, role="assistant"), chat_chunk("a", 4), chat_chunk("b", 10, finish_reason="length"),
              final_usage_with(metrics), DONE]

    def answer(request: httpx.Request) -> httpx.Response:
        if b'"stream":true' in request.content:
            return httpx.Response(200, content=b"".join(events))
        return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 10},
                                         "metrics": metrics})

    return ScriptedWorker(on_post=answer)


def _sample(metrics_text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == MODEL:
                return float(sample.value)
    return None


@pytest.mark.parametrize("body", [STREAM, CHAT], ids=["stream", "whole"])
async def test_a_workers_per_request_report_is_exported_and_logged(
    body: dict[str, Any], caplog: pytest.LogCaptureFixture,
) -> None:
    worker = _streaming_worker(REPORT)
    with caplog.at_level("INFO", logger="specgate.requests"):
        async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
            answer = await client.post("/v1/chat/completions", json=body)
            text = (await client.get("/metrics")).text
    assert answer.status_code == 200
    assert _sample(text, "specgate_spec_draft_tokens_total") == 12
    assert _sample(text, "specgate_spec_accepted_tokens_total") == 6
    assert _sample(text, "specgate_spec_acceptance_rate_sum") == 0.5
    assert _sample(text, "specgate_spec_acceptance_length_sum") == 2.5  # 1 + 6 accepted / 4 steps
    logged = [json.loads(record.getMessage()) for record in caplog.records if record.name == "specgate.requests"]
    assert logged[-1]["spec_acceptance_rate"] == 0.5 and logged[-1]["spec_mean_acceptance_length"] == 2.5


async def test_a_client_that_did_not_ask_for_usage_does_not_get_the_report() -> None:
    worker = _streaming_worker(REPORT)
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
        unasked = await client.post("/v1/chat/completions", json=STREAM)
        asked = await client.post("/v1/chat/completions",
                                  json={**STREAM, "stream_options": {"include_usage": True}})
    assert "speculative_decoding" not in unasked.text and "usage" not in unasked.text
    assert '"speculative_decoding"' in asked.text


@pytest.mark.parametrize("metrics", [
    None, "x", [], {"speculative_decoding": "x"}, {"speculative_decoding": {}},
    {"speculative_decoding": {**REPORT["speculative_decoding"], "num_draft_tokens": "12"}},
    {"speculative_decoding": {**REPORT["speculative_decoding"], "num_accepted_draft_tokens": -1}},
    {"speculative_decoding": {**REPORT["speculative_decoding"], "num_accepted_draft_tokens": 13}},
])
async def test_a_missing_or_malformed_report_is_a_request_without_speculation(metrics: Any) -> None:
    worker = _streaming_worker(metrics)
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, _):
        answers = [await client.post("/v1/chat/completions", json=body) for body in (STREAM, CHAT)]
        text = (await client.get("/metrics")).text
    assert [answer.status_code for answer in answers] == [200, 200]
    assert answers[0].text.rstrip().endswith("[DONE]")
    assert not _sample(text, "specgate_spec_draft_tokens_total")
    assert _sample(text, "specgate_requests_total") == 2


def test_speculative_profiles_ask_vllm_for_the_per_request_report() -> None:
    argv = render(find_profile("cpu-demo"), host="127.0.0.1", port=8100, models_dir=Path("/m")).argv
    assert argv[argv.index("--per-request-spec-decode-metrics") + 1] == "summary"
    plain = render(find_profile("cpu-baseline"), host="127.0.0.1", port=8100, models_dir=Path("/m")).argv
    assert "--per-request-spec-decode-metrics" not in plain
