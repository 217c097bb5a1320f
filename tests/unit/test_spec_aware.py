"""Serving statistics learned from finished requests, the spec_aware policy that routes on them, and the advice."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.observability.metrics import Metrics
from gateway.observability.record import RequestRecord
from gateway.schemas import validate_call
from gateway.workers.pool import PoolTiming, Worker, WorkerPool
from gateway.workers.routing import SpecAware, make_policy
from gateway.workers.serving_stats import ServingStats, load_bucket
from tests.unit.fakes import DONE, MODEL, STREAM, ScriptedWorker, chat_chunk, gateway_client, mock_client, settings_for
from tests.unit.test_speculation_metrics import REPORT, final_usage_with

CALL = validate_call("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
SPEC, PLAIN = "http://spec:1", "http://plain:1"


def _finished(worker: str, open_at_start: int, tpot_s: float, accepted: float | None = None) -> RequestRecord:
    """A 65-token request that got `tpot_s` per token on `worker` with `open_at_start` open there."""
    record = RequestRecord(request_id="r", model=MODEL, endpoint="chat", stream=True, received_at=0.0,
                           worker=worker, worker_open_at_start=open_at_start, output_tokens=65,
                           first_token_at=1.0, last_token_at=1.0 + 64 * tpot_s)
    if accepted is not None:
        record.spec_draft_tokens, record.spec_accepted_tokens, record.spec_steps = 100, int(accepted * 100), 40
    return record


def _speculating_tpot(open_requests: int) -> float:
    return 0.010 + 0.006 * open_requests  # fast alone, slow once its batches fill


def _plain_tpot(open_requests: int) -> float:
    return 0.020 + 0.001 * open_requests


def test_the_tpot_curve_interpolates_never_falls_and_grows_beyond_what_was_measured() -> None:
    stats = ServingStats()
    stats.observe(_finished(SPEC, 1, 0.010))
    stats.observe(_finished(SPEC, 16, 0.100))  # bucket 13-16: stands for load 14.5
    failed = _finished(SPEC, 1, 5.0)
    failed.status = "502"
    stats.observe(failed)
    one_token = _finished(SPEC, 1, 5.0)
    one_token.output_tokens = 1
    stats.observe(one_token)
    assert stats.expected_tpot(MODEL, SPEC, 1) == pytest.approx(0.010), "failed and one-token requests ignored"
    assert stats.expected_tpot(MODEL, SPEC, 7.75) == pytest.approx(0.055)  # half way
    assert stats.expected_tpot(MODEL, SPEC, 29) == pytest.approx(0.200), "twice the load, twice the TPOT"
    assert stats.expected_tpot(MODEL, PLAIN, 1) is None
    for _ in range(5):
        stats.observe(_finished(SPEC, 4, 0.005))  # a noisy bucket faster than load 1: pooled with it
    at_one, at_four = stats.expected_tpot(MODEL, SPEC, 1), stats.expected_tpot(MODEL, SPEC, 4)
    assert at_one is not None and at_four is not None
    assert at_one < 0.010 and at_one <= at_four, "pooled: never faster at a higher load"
    assert load_bucket(0) == load_bucket(1) and load_bucket(10_000) == load_bucket(100_000)


def test_a_request_is_filed_under_the_load_it_ran_at_not_the_load_it_found() -> None:
    """A alone for 1 s, with B for 1 s, alone again for 2 s: A ran at 1.25 open requests on average, B at 2."""
    now = [0.0]
    pool = WorkerPool([SPEC], mock_client(), Metrics(), lambda: now[0], PoolTiming())
    worker = Worker(SPEC)
    first, second = _finished(SPEC, 1, 0.050), _finished(SPEC, 2, 0.050)
    pool.started(worker, first)
    now[0] = 1.0
    pool.started(worker, second)
    now[0] = 2.0
    pool.finished(worker, second)
    now[0] = 4.0
    pool.finished(worker, first)
    assert first.worker_mean_open == pytest.approx(1.25) and second.worker_mean_open == pytest.approx(2.0)
    assert worker.in_flight == 0
    # Found alone, but served with seven others: filed under eight open requests.
    busy = _finished(SPEC, 1, 0.200)
    busy.worker_mean_open = 8.0
    stats = ServingStats()
    stats.observe(busy)
    assert stats.expected_tpot(MODEL, SPEC, 7.5) == pytest.approx(0.200)
    assert stats.advice()[MODEL]["workers"][0]["tpot_s_by_open_requests"] == {"7-8": {"tpot_s": 0.2, "requests": 1}}


def test_spec_aware_tries_unmeasured_workers_first_then_the_lowest_expected_tpot() -> None:
    stats = ServingStats()
    spec, plain = Worker(SPEC), Worker(PLAIN)
    policy = SpecAware(lambda worker: worker.in_flight, stats, rng=random.Random(1))
    stats.observe(_finished(SPEC, 1, _speculating_tpot(1)))
    assert policy.choose([spec, plain], CALL) is plain, "never measured: tried before any comparison"
    stats.observe(_finished(PLAIN, 1, _plain_tpot(1)))
    for load in (0, 8):
        spec.in_flight = plain.in_flight = load
        stats.observe(_finished(SPEC, load + 1, _speculating_tpot(load + 1)))
        stats.observe(_finished(PLAIN, load + 1, _plain_tpot(load + 1)))
    spec.in_flight = plain.in_flight = 0
    chosen = Counter(policy.choose([spec, plain], CALL).url for _ in range(200))
    assert chosen[SPEC] > 180 and chosen[PLAIN] > 0, chosen  # mostly the faster, a few explored
    spec.in_flight = plain.in_flight = 8
    chosen = Counter(policy.choose([spec, plain], CALL).url for _ in range(200))
    assert chosen[PLAIN] > 180 and chosen[SPEC] > 0, chosen


@pytest.mark.parametrize(("concurrency", "favoured"), [(1, SPEC), (24, PLAIN)])
def test_spec_aware_learns_online_where_each_request_is_served_fastest(concurrency: int, favoured: str) -> None:
    """Workers whose TPOT follows their load: the policy finds which is faster at the load it runs at."""
    stats = ServingStats()
    workers = {SPEC: Worker(SPEC), PLAIN: Worker(PLAIN)}
    tpot_of = {SPEC: _speculating_tpot, PLAIN: _plain_tpot}
    policy = make_policy("spec_aware", lambda worker: worker.in_flight, stats)
    rng = random.Random(7)
    open_requests: list[str] = []
    chosen: Counter[str] = Counter()
    for step in range(2000):
        if len(open_requests) >= concurrency:  # one request ends, at random, before the next starts
            ended = open_requests.pop(rng.randrange(len(open_requests)))
            workers[ended].in_flight -= 1
        worker = policy.choose(list(workers.values()), CALL)
        worker.in_flight += 1
        open_requests.append(worker.url)
        stats.observe(_finished(worker.url, worker.in_flight, tpot_of[worker.url](worker.in_flight)))
        if step >= 1000:
            chosen[worker.url] += 1
    assert chosen[favoured] > chosen.total() * 0.6, chosen
    other = PLAIN if favoured == SPEC else SPEC
    assert chosen[other] > 0, "the other worker is not starved"


def test_advice_says_which_kind_of_worker_serves_the_traffic_seen_better() -> None:
    stats = ServingStats()
    assert stats.advice() == {}
    for _ in range(20):
        stats.observe(_finished(SPEC, 1, _speculating_tpot(1), accepted=0.6))
    only_one_kind = stats.advice()[MODEL]["advice"]["verdict"]
    assert only_one_kind.startswith("not enough data")
    for _ in range(20):
        stats.observe(_finished(PLAIN, 1, _plain_tpot(1)))
    advice = stats.advice()[MODEL]
    assert advice["advice"]["verdict"] == "speculating workers serve this traffic better"
    spec_entry = next(entry for entry in advice["workers"] if entry["worker"] == SPEC)
    assert spec_entry["speculates"] and spec_entry["acceptance_rate"] == pytest.approx(0.6)
    # The traffic moves to high load, where the speculating worker is the slower.
    for _ in range(200):
        stats.observe(_finished(SPEC, 40, _speculating_tpot(40), accepted=0.6))
        stats.observe(_finished(PLAIN, 40, _plain_tpot(40)))
    assert stats.advice()[MODEL]["advice"]["verdict"] == "plain workers serve this traffic better"


@pytest.mark.anyio
async def test_admin_speculation_reports_what_the_gateways_requests_measured() -> None:
    events = [chat_chunk("", 0, role="assistant"), chat_chunk("a", 4), chat_chunk("b", 10, finish_reason="length"),
              final_usage_with(REPORT), DONE]

    async def one_event_a_read() -> AsyncIterator[bytes]:
        for event in events:
            await asyncio.sleep(0.001)  # a token rate to measure
            yield event

    worker = ScriptedWorker(on_post=lambda request: httpx.Response(200, content=one_event_a_read()))
    settings = settings_for(worker.url, routing="spec_aware", api_keys="key")
    async with gateway_client(settings, mock_client(worker)) as (client, _):
        headers = {"authorization": "Bearer key"}
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=STREAM, headers=headers)).status_code == 200
        refused = await client.get("/admin/speculation")
        answer = (await client.get("/admin/speculation", headers=headers)).json()
    assert refused.status_code == 401
    [entry] = answer["models"][MODEL]["workers"]
    assert entry["worker"] == worker.url and entry["speculates"] is True and entry["requests"] == 3
    assert entry["acceptance_rate"] == pytest.approx(0.5)


@pytest.mark.anyio
async def test_a_worker_without_speculation_metrics_is_routed_as_an_ordinary_one() -> None:
    plain = ScriptedWorker(on_post=lambda request: httpx.Response(200, json={"choices": []}))
    async with gateway_client(settings_for(plain.url, routing="spec_aware"), mock_client(plain)) as (client, _):
        answers = [await client.post("/v1/chat/completions", json={**STREAM, "stream": False}) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
