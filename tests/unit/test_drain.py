"""Graceful shutdown's drain over real HTTP: new work refused, open calls cut at the grace's deadline, not before."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.unit.fakes import CHAT, STREAM, SlowWorker, data_events, gateway_over, vllm_stream, wait_until


def test_graceful_shutdown_refuses_new_work_and_ends_long_streams_after_the_grace() -> None:
    long_stream = SlowWorker(vllm_stream([1] * 400), gap_s=0.02)
    with (
        gateway_over(long_stream, shutdown_grace_s=0.5) as (url, app),
        httpx.Client(base_url=url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=STREAM) as open_stream,
    ):
        lines = open_stream.iter_lines()
        next(lines)
        app.state.drainer.begin()
        assert wait_until(lambda: client.get("/ready").status_code == 503, 2)
        refused = client.post("/v1/chat/completions", json=STREAM)
        rest = [line for line in lines if line.startswith("data:")]
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "shutting_down"
    assert json.loads(rest[-1][6:])["error"]["code"] == "shutting_down"
    assert len(rest) < 400
    assert wait_until(long_stream.disconnected.is_set, 2)


def test_a_stream_that_finishes_within_the_grace_is_not_cut() -> None:
    short = SlowWorker(vllm_stream([1] * 10), gap_s=0.02)
    with (
        gateway_over(short, shutdown_grace_s=5) as (url, app),
        httpx.Client(base_url=url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=STREAM) as open_stream,
    ):
        lines = open_stream.iter_lines()
        next(lines)
        app.state.drainer.begin()
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"


def test_a_whole_call_still_running_at_the_drain_deadline_is_a_503_and_its_worker_is_let_go() -> None:
    slow = SlowWorker([b'{"choices": []}'], gap_s=0.0, first_delay_s=30)
    with gateway_over(slow, shutdown_grace_s=0.5) as (url, app), httpx.Client(base_url=url, timeout=10) as client:
        threading.Timer(0.2, app.state.drainer.begin).start()
        started = time.monotonic()
        reply = client.post("/v1/chat/completions", json=CHAT)
        took = time.monotonic() - started
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "shutting_down"
    assert reply.headers["retry-after"]
    assert took < 1.5, took
    assert wait_until(slow.disconnected.is_set, 2)


def test_a_stream_that_opens_during_the_drain_ends_at_the_same_deadline() -> None:
    # Its first token comes 1 s after the drain began; a grace counted from then would end it at 2 s.
    late = SlowWorker(vllm_stream([1] * 400), gap_s=0.02, first_delay_s=1.0)
    with gateway_over(late, shutdown_grace_s=1.0) as (url, app), httpx.Client(base_url=url, timeout=10) as client:
        threading.Timer(0.05, app.state.drainer.begin).start()
        started = time.monotonic()
        reply = client.post("/v1/chat/completions", json=STREAM)
        took = time.monotonic() - started
    events = data_events(reply.text)
    assert json.loads(events[-1][6:])["error"]["code"] == "shutting_down"
    assert took < 1.6, took
