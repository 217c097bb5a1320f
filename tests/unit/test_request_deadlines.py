"""The gateway's deadlines over real HTTP: first token, whole call, idle stream; keepalive pings on quiet streams."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from gateway.admission.deadlines import FirstTokenBudget
from tests.unit.fakes import (
    CHAT,
    STREAM,
    SlowWorker,
    chat_chunk,
    data_events,
    gateway_over,
    settings_for,
    vllm_stream,
    wait_until,
)


def test_a_worker_with_no_first_token_in_time_is_abandoned_for_another() -> None:
    hung = SlowWorker(vllm_stream([1]), gap_s=0, first_delay_s=30)
    healthy = SlowWorker(vllm_stream([1, 1]), gap_s=0)
    with gateway_over(hung, healthy, first_token_timeout_s=0.3, routing="round_robin") as (url, _):
        answers = [httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert all(data_events(a.text)[-1] == "data: [DONE]" for a in answers)
    assert hung.started.is_set() and wait_until(hung.disconnected.is_set, 2), "the hung request was closed"


def test_the_first_token_wait_scales_with_the_prompt_and_the_workers_queue_up_to_its_cap() -> None:
    budget = FirstTokenBudget(base_s=10, per_prompt_kib_s=0.5, per_waiting_s=2, cap_s=120)
    assert budget.limit_s(0, 0) == 10
    assert budget.limit_s(8 * 1024, 0) == 14
    assert budget.limit_s(0, 5) == 20
    assert budget.limit_s(1024 * 1024, 0) == 120
    assert budget.limit_s(0, -1) == 10  # a gauge read while it was reset


def test_a_long_prompt_waits_longer_for_its_first_token_than_a_short_one() -> None:
    hung = SlowWorker(vllm_stream([1]), gap_s=0, first_delay_s=60)
    healthy = SlowWorker(vllm_stream([1, 1]), gap_s=0)
    long_prompt = {**STREAM, "messages": [{"role": "user", "content": "x" * 4096}]}
    with gateway_over(hung, healthy, first_token_base_s=0.2, first_token_per_prompt_kib_s=0.5,
                      first_token_timeout_s=30, routing="round_robin") as (url, _):
        took = {}
        for name, body in (("short", STREAM), ("long", long_prompt)):
            started = time.monotonic()
            answers = [httpx.post(url + "/v1/chat/completions", json=body, timeout=30) for _ in range(2)]
            took[name] = time.monotonic() - started
            assert [a.status_code for a in answers] == [200, 200]
    # The long one's 4 KiB bought it 2 s more on the hung worker before it was tried on the other.
    assert took["long"] >= 2.0, took
    assert took["long"] > took["short"] + 1.0, took


def test_a_whole_call_ends_at_the_request_timeout_with_retries_counted_in_it() -> None:
    # Each worker dribbles its answer: every wait is far inside the limit, the whole answer takes 1.2 s.
    dribbling = [SlowWorker([b"{" + b" " * 16] * 6 + [b"}"], gap_s=0.2) for _ in range(2)]
    with gateway_over(*dribbling, request_timeout_s=0.5, routing="round_robin") as (url, _):
        started = time.monotonic()
        reply = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=10)
        took = time.monotonic() - started
    assert reply.status_code == 504 and reply.json()["error"]["type"] == "upstream_timeout"
    # Cut at 0.5 s, not once per worker: the second worker was never asked.
    assert took < 0.9, took
    assert sum(worker.started.is_set() for worker in dribbling) == 1
    assert wait_until(lambda: any(worker.disconnected.is_set() for worker in dribbling), 2)


def test_a_stalled_stream_ends_with_an_idle_timeout_error_event() -> None:
    stalled = SlowWorker(vllm_stream([1] * 5), gap_s=30)
    with gateway_over(stalled, stream_idle_timeout_s=0.3) as (url, _):
        started = time.monotonic()
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
        took = time.monotonic() - started
    events = data_events(reply.text)
    assert reply.status_code == 200
    assert json.loads(events[-1][6:])["error"]["type"] == "upstream_timeout"
    assert "finish_reason\": \"stop" not in reply.text
    assert took < 5
    assert wait_until(stalled.disconnected.is_set, 2)


def test_a_quiet_stream_gets_keepalive_pings_between_its_events() -> None:
    slow = SlowWorker(vllm_stream([1] * 3), gap_s=0.5)
    with gateway_over(slow, sse_ping_interval_s=0.1) as (url, _):
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    comments = [event for event in reply.text.split("\n\n") if event.startswith(":")]
    assert reply.status_code == 200
    assert len(comments) >= 3 and all(comment.startswith(": ping") for comment in comments), comments
    assert data_events(reply.text)[-1] == "data: [DONE]"
    assert len(data_events(reply.text)) == 5  # role, three tokens, [DONE]; the usage chunk was not asked for


def test_the_first_ping_comes_one_interval_into_the_stream_and_short_streams_get_none() -> None:
    # Events 0.6 s apart, pings every 0.4 s: the first ping lands between the first two events (at 0.4 s, not
    # at 0.8 s, after the second event, as it would were the interval waited twice).
    slow = SlowWorker(vllm_stream([1] * 2), gap_s=0.6)
    quick = SlowWorker(vllm_stream([1] * 2), gap_s=0.01)
    with gateway_over(slow, sse_ping_interval_s=0.4) as (url, _):
        reply = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    with gateway_over(quick, sse_ping_interval_s=0.4) as (url, _):
        short = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=10)
    events = [event for event in reply.text.split("\n\n") if event]
    assert events[0].startswith("data:") and events[1].startswith(": ping"), events
    assert events[-1] == "data: [DONE]"
    assert short.status_code == 200 and ": ping" not in short.text and short.text.endswith("data: [DONE]\n\n")


class FirstReadClient:
    """A worker client whose answer's first read reaches the gateway's opening sink `arrives_s` after the request,
    and whose reader comes back `reader_back_s` after that: the two moments the first-token deadline can fall
    between."""

    def __init__(self, arrives_s: float, reader_back_s: float = 0.0) -> None:
        self.arrives_s = arrives_s
        self.reader_back_s = reader_back_s
        self.taken: list[bool] = []
        self.closed = False

    async def post(self, worker_url: str, path: str, body: bytes, request_id: str, streaming: bool) -> Any:
        from gateway.upstream.client import Sink, WorkerReply

        async def read() -> bytes:
            return b""

        async def read_first_inline(sink: Sink) -> bytes | None:
            loop = asyncio.get_running_loop()
            taken: asyncio.Future[None] = loop.create_future()

            def arrive() -> None:
                self.taken.append(sink(chat_chunk("a", 1)))
                if not taken.done():  # cancelled, with its task, by a deadline that passed first
                    taken.set_result(None)

            loop.call_later(self.arrives_s, arrive)
            await taken
            await asyncio.sleep(self.reader_back_s)
            return None

        async def close() -> None:
            self.closed = True

        return WorkerReply(200, {}, read, close, None, read_first_inline)


def _recorded(sent: list[bytes]) -> Any:
    def opening(data: bytes) -> bool:
        sent.append(data)
        return True

    return opening


@pytest.mark.anyio
async def test_a_first_read_after_the_first_token_deadline_does_not_reach_the_client() -> None:
    from gateway.errors import UpstreamTimeout
    from gateway.upstream.calls import Upstream

    # The deadline's cancel may be on its way to the task when the read arrives: sent to the client then, the
    # stream would be retried on another worker with the first worker's bytes already out.
    late = FirstReadClient(arrives_s=0.3)
    sent: list[bytes] = []
    upstream = Upstream(late, settings_for("http://w", first_token_timeout_s=0.2), time.perf_counter)
    with pytest.raises(UpstreamTimeout):
        await upstream.open_stream("http://w", "/v1/chat/completions", b"{}", "r1", _recorded(sent))
    await asyncio.sleep(0.2)
    assert late.taken == [False] and sent == [] and late.closed


@pytest.mark.anyio
async def test_a_first_read_sent_to_the_client_ends_the_first_token_deadline() -> None:
    from gateway.upstream.calls import Upstream

    # Taken at 0.1 s of a 0.2 s deadline, the reader back at 0.4 s: from the first bytes out, no retry elsewhere.
    quick = FirstReadClient(arrives_s=0.1, reader_back_s=0.3)
    sent: list[bytes] = []
    upstream = Upstream(quick, settings_for("http://w", first_token_timeout_s=0.2), time.perf_counter)
    opened = await upstream.open_stream("http://w", "/v1/chat/completions", b"{}", "r1", _recorded(sent))
    assert quick.taken == [True] and sent == [chat_chunk("a", 1)]
    assert opened.first_events == [] and not quick.closed
    await opened.aclose()
