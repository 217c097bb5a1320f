"""The worker pool under faults: ejection and its backoff, draining workers, load scrapes, discovery and
health checks, through the gateway on mock transports (a 429 retried elsewhere: test_upstream_errors.py)."""

from __future__ import annotations

import httpx
import pytest

from gateway.observability.metrics import Metrics
from gateway.workers.discovery import resolve
from gateway.workers.load import parse_load
from gateway.workers.pool import PoolTiming, Worker, WorkerPool
from tests.unit.fakes import CHAT, ScriptedWorker, gateway_client, mock_client, settings_for


@pytest.mark.anyio
async def test_consecutive_failures_eject_a_worker_then_it_is_tried_again() -> None:
    flaky = ScriptedWorker(url="http://flaky:1", on_post=lambda r: httpx.Response(500))
    good = ScriptedWorker(url="http://good:1", on_post=lambda r: httpx.Response(200, json={"choices": []}))
    now = [100.0]
    settings = settings_for(flaky.url, good.url, routing="round_robin", eject_after_failures=2)
    async with gateway_client(settings, mock_client(flaky, good), clock=lambda: now[0]) as (client, _app):
        for _ in range(4):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        tried_while_ok = len(flaky.seen)
        for _ in range(6):
            await client.post("/v1/chat/completions", json=CHAT)
        assert len(flaky.seen) == tried_while_ok, "an ejected worker gets no requests"
        view = (await client.get("/admin/workers")).json()["workers"]
        assert [w["available"] for w in view] == [False, True]
        now[0] += 60
        flaky.on_post = lambda r: httpx.Response(200, json={"choices": []})
        for _ in range(4):
            await client.post("/v1/chat/completions", json=CHAT)
        assert len(flaky.seen) > tried_while_ok, "after its backoff the worker is tried again"


@pytest.mark.anyio
async def test_the_whole_pool_is_never_ejected() -> None:
    workers = [ScriptedWorker(url=f"http://w{i}:1", on_post=lambda r: httpx.Response(500)) for i in range(2)]
    async with gateway_client(settings_for(*(w.url for w in workers), eject_after_failures=1),
                              mock_client(*workers)) as (client, _):
        for _ in range(3):
            await client.post("/v1/chat/completions", json=CHAT)
        seen = sum(len(w.seen) for w in workers)
        await client.post("/v1/chat/completions", json=CHAT)
        assert sum(len(w.seen) for w in workers) > seen, "with everyone ejected, workers are still tried"


@pytest.mark.anyio
async def test_a_draining_worker_gets_no_new_requests() -> None:
    draining = ScriptedWorker(url="http://draining:1", on_post=lambda r: httpx.Response(200, json={"choices": []}))
    other = ScriptedWorker(url="http://other:1", on_post=lambda r: httpx.Response(200, json={"choices": []}))
    async with gateway_client(settings_for(draining.url, other.url, routing="round_robin"),
                              mock_client(draining, other)) as (client, app):
        draining.healthy = False  # vLLM answers 503 on /health while it drains
        await app.state.services.pool.refresh()
        for _ in range(4):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert draining.seen == [] and len(other.seen) == 4


@pytest.mark.anyio
async def test_load_is_scraped_and_stale_load_is_ignored() -> None:
    worker = ScriptedWorker(url="http://w:1", metrics_text="vllm:num_requests_waiting{model_name=\"demo\"} 7.0\n")
    now = [10.0]
    async with gateway_client(settings_for(worker.url), mock_client(worker), clock=lambda: now[0]) as (_, app):
        pool = app.state.services.pool
        (tracked,) = pool.workers
        assert pool.queue_depth(tracked) == 7
        now[0] += 4 * pool.timing.scrape_interval_s
        assert pool.queue_depth(tracked) == 0, "a queue length several scrapes old must not steer routing"


def test_parse_load_sums_label_sets_and_ignores_other_metrics() -> None:
    text = "\n".join([
        "# HELP vllm:num_requests_running x",
        'vllm:num_requests_running{engine="0",model_name="demo"} 2.0',
        'vllm:num_requests_running{engine="1",model_name="demo"} 3.0',
        'vllm:kv_cache_usage_perc{model_name="demo"} 0.25',
        'vllm:spec_decode_num_draft_tokens_total{model_name="demo"} 300.0',
        'vllm:spec_decode_num_accepted_tokens_total{model_name="demo"} 150.0',
        'vllm:spec_decode_num_drafts_total{model_name="demo"} 100.0',
        'vllm:num_requests_running_by_reason{model_name="demo"} 99.0',
    ])
    load = parse_load(text, now=1.0)
    assert (load.running, load.kv_cache_usage) == (5.0, 0.25)
    assert load.acceptance_rate == 0.5
    assert load.mean_acceptance_length == 2.5


@pytest.mark.anyio
async def test_dns_names_resolve_to_one_worker_per_address() -> None:
    urls = await resolve(["dns+http://localhost:8100", "http://static:9000"])
    assert "http://127.0.0.1:8100" in urls
    assert "http://static:9000" in urls
    assert await resolve(["dns+http://no-such-host.invalid:1"]) == []


@pytest.mark.anyio
async def test_discovery_adds_and_removes_workers_and_forgets_their_gauges() -> None:
    metrics = Metrics()
    removed: list[str] = []
    pool = WorkerPool(["http://a:1", "http://b:1"], mock_client(), metrics, lambda: 0.0, PoolTiming())
    pool.on_removed(removed.append)
    await pool.discover()
    kept = pool.workers[0]
    metrics.publish_worker("http://b:1", available=True, in_flight=0, load=Worker("x").load)
    pool._entries = ["http://a:1", "http://c:1"]
    await pool.discover()
    assert [w.url for w in pool.workers] == ["http://a:1", "http://c:1"]
    assert pool.workers[0] is kept, "a worker that stays keeps its state"
    assert removed == ["http://b:1"]
    assert metrics.registry.get_sample_value("specgate_worker_healthy", {"worker": "http://b:1"}) is None


@pytest.mark.anyio
async def test_one_slow_health_check_does_not_take_a_busy_worker_out() -> None:
    worker = ScriptedWorker(url="http://busy:1", on_post=lambda r: httpx.Response(200, json={"choices": []}))
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, app):
        pool = app.state.services.pool
        worker.health_error = httpx.ReadTimeout("busy")
        await pool.refresh()
        assert (await client.get("/ready")).status_code == 200, "one missed deadline is not a dead worker"
        await pool.refresh()
        assert (await client.get("/ready")).status_code == 503, "two in a row are"
        worker.health_error = None
        await pool.refresh()
        assert (await client.get("/ready")).status_code == 200


@pytest.mark.anyio
async def test_a_refused_health_check_takes_the_worker_out_at_once() -> None:
    worker = ScriptedWorker(url="http://gone:1")
    async with gateway_client(settings_for(worker.url), mock_client(worker)) as (client, app):
        worker.health_error = httpx.ConnectError("refused")
        await app.state.services.pool.refresh()
        assert (await client.get("/ready")).status_code == 503


@pytest.mark.anyio
async def test_a_drained_worker_gets_no_new_requests_until_it_is_put_back() -> None:
    first = ScriptedWorker(url="http://first:1", on_post=lambda r: httpx.Response(200, json={"choices": []}))
    second = ScriptedWorker(url="http://second:1", on_post=lambda r: httpx.Response(200, json={"choices": []}))
    settings = settings_for(first.url, second.url, routing="round_robin")
    async with gateway_client(settings, mock_client(first, second)) as (client, _app):
        drained = await client.post("/admin/workers/drain", json={"worker": first.url})
        assert drained.status_code == 200 and drained.json()["draining"] is True
        for _ in range(6):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert not first.seen and len(second.seen) == 6
        view = {w["url"]: w for w in (await client.get("/admin/workers")).json()["workers"]}
        assert view[first.url]["draining"] and not view[first.url]["available"]
        undrained = await client.post("/admin/workers/drain", json={"worker": first.url, "drain": False})
        assert undrained.status_code == 200
        for _ in range(4):
            await client.post("/v1/chat/completions", json=CHAT)
        assert len(first.seen) == 2, "back in routing"
        unknown = await client.post("/admin/workers/drain", json={"worker": "http://nowhere:1"})
        assert unknown.status_code == 404
        assert (await client.post("/admin/workers/drain", json={"drain": "yes"})).status_code == 400


@pytest.mark.anyio
async def test_only_an_admin_or_this_machine_may_drain_a_worker() -> None:
    worker = ScriptedWorker(on_post=lambda r: httpx.Response(200, json={"choices": []}))
    app_settings = settings_for(worker.url)
    async with gateway_client(app_settings, mock_client(worker)) as (_client, app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.9.9.9", 1)),
                                     base_url="http://gateway") as remote:
            refused = await remote.post("/admin/workers/drain", json={"worker": worker.url})
            assert refused.status_code == 403
        assert not app.state.services.pool.workers[0].draining
