"""Mid-stream failover over real sockets: a gateway process in front of two fake engines in numbered mode (test
doubles whose token i reads " t{i}"), one of which resets every stream after a few events: every client stream
still holds each token once, in order."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from loadtest.fake_config import FakeEngineConfig, FaultConfig
from loadtest.fake_engine import run_in_thread
from loadtest.fake_numbered import continued_from, numbered_text
from tests.support import gateway_process

TOKENS = 30


def test_numbered_mode_continues_from_the_last_number() -> None:
    assert numbered_text(3, 2) == b" t3 t4"
    chat = {"messages": [{"role": "user", "content": "x t9"}, {"role": "assistant", "content": " t0 t1 t2"}],
            "continue_final_message": True}
    assert continued_from(chat, chat=True) == 3
    assert continued_from({**chat, "continue_final_message": False}, chat=True) == 0
    assert continued_from({"prompt": "go: t0 t1"}, chat=False) == 2


async def _stream_text(client: httpx.AsyncClient, chat: bool) -> str:
    body: dict[str, object] = {"model": "demo", "stream": True, "max_tokens": TOKENS, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": "count"}]
    else:
        body["prompt"] = "count:"
    text = ""
    async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as answer:
        assert answer.status_code == 200
        async for line in answer.aiter_lines():
            if line.startswith("data: {"):
                payload = orjson.loads(line[6:])
                assert "error" not in payload, payload
                for choice in payload.get("choices") or []:
                    text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text


@pytest.mark.anyio
async def test_streams_whose_worker_resets_them_come_out_whole() -> None:
    timing = {"ttft_s": 0.005, "gap_s": 0.002, "output_len": 200, "numbered": True}
    failing = FakeEngineConfig(**timing, faults=FaultConfig(probabilities=(("reset", 1.0),), after_events=6))
    with (run_in_thread(failing) as dying, run_in_thread(FakeEngineConfig(**timing)) as healthy,
          gateway_process(f"{dying},{healthy}", routing="round_robin", warmup_timeout_s="0") as gateway):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            texts = await asyncio.gather(*(_stream_text(client, chat=index % 2 == 0) for index in range(40)))
            metrics = (await client.get("/metrics")).text
    expected = numbered_text(0, TOKENS).decode()
    assert [index for index, text in enumerate(texts) if text != expected] == []
    resumed = [line for line in metrics.splitlines()
               if line.startswith("specgate_stream_migrations_total") and 'outcome="resumed"' in line]
    assert resumed and float(resumed[0].rsplit(" ", 1)[1]) >= 10, resumed
