"""A real Prometheus (Debian's `prometheus` package) scraping a running gateway and vLLM worker: the TTFT
quantile and the speculative acceptance rate through its HTTP API, the recording rules on live data, and
every metric the dashboard and the rules read present on a real scrape.

Needs the fixtures `gateway_url` and `worker_url` (tests/integration/conftest.py); the worker serves the
speculative `demo` profile (cpu-demo), the gateway routes to it.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.promql_support import SYNTHETIC_METRICS, VLLM_METRICS, raw_metrics_used
from tests.deploy.support import RULE_FILES
from tests.support import free_port

pytestmark = pytest.mark.integration

MODEL = "demo"
STREAMED_REQUESTS = 4
STARTUP_DEADLINE_S = 60.0
DATA_DEADLINE_S = 90.0
SCRAPE_DEADLINE_S = 30.0
# Series that exist only after an event this test does not cause, with the reason.
ONLY_AFTER_EVENTS = {
    "specgate_upstream_retries_total": "counts attempts moved to another worker after a failure; none is injected",
}

T = TypeVar("T")


def _poll(what: str, probe: Callable[[], T | None], deadline_s: float, interval_s: float = 0.5) -> T:
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last_error, result = exc, None
        if result is not None:
            return result
        time.sleep(interval_s)
    raise AssertionError(f"{what}: nothing within {deadline_s:.0f} s (last error: {last_error})")


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, gateway_url: str, worker_url: str) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus missing (Debian package: prometheus)")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULE_FILES],
        "scrape_configs": [
            {"job_name": "specgate-gateway", "static_configs": [{"targets": [_host_port(gateway_url)]}]},
            {"job_name": "vllm", "static_configs": [{"targets": [_host_port(worker_url)]}]},
        ],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool | None:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            return True if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200 else None

        _poll("prometheus ready", ready, STARTUP_DEADLINE_S)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


def _query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _finite_scalar(prometheus: str, promql: str) -> float | None:
    """The single value of an instant query, once it is a finite number."""
    result = _query(prometheus, promql)
    if len(result) != 1:
        return None
    value = float(result[0]["value"][1])
    return value if math.isfinite(value) else None


def _stream_chat(client: httpx.Client, gateway_url: str, prompt: str, *, stop_after_first: bool = False) -> int:
    """One streamed chat completion; returns the content events received."""
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 512 if stop_after_first else 32,
        "temperature": 0,
        "stream": True,
    }
    if stop_after_first:
        payload["ignore_eos"] = True
    events = 0
    with client.stream("POST", f"{gateway_url}/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                events += 1
                if stop_after_first:
                    break
    return events


@pytest.fixture(scope="module")
def traffic(prometheus: str, gateway_url: str) -> None:
    """Both targets scraped first, then requests: rates need samples from before and after them."""
    def both_scraped_twice() -> bool | None:
        result = _query(prometheus, "sum_over_time(up[1m]) >= 2")
        return True if {r["metric"]["job"] for r in result} == {"specgate-gateway", "vllm"} else None

    _poll("gateway and worker scraped", both_scraped_twice, STARTUP_DEADLINE_S)
    with httpx.Client(timeout=httpx.Timeout(120, connect=5)) as client:
        for i in range(STREAMED_REQUESTS):
            assert _stream_chat(client, gateway_url, f"def fibonacci_{i}(n):") > 0
        # One client that goes away mid-stream, so the disconnect counter exists.
        assert _stream_chat(client, gateway_url, "import os\n", stop_after_first=True) == 1


def test_prometheus_scrapes_the_gateway_and_the_worker(prometheus: str, traffic: None) -> None:
    jobs = {r["metric"]["job"]: r["value"][1] for r in _query(prometheus, "up")}
    assert jobs == {"specgate-gateway": "1", "vllm": "1"}


def test_ttft_median_through_the_http_api(prometheus: str, traffic: None) -> None:
    promql = "histogram_quantile(0.5, sum by (le) (rate(specgate_time_to_first_token_seconds_bucket[1m])))"
    ttft = _poll("TTFT median", lambda: _finite_scalar(prometheus, promql), DATA_DEADLINE_S)
    assert 0 < ttft < 60


def test_speculative_acceptance_rate_through_the_http_api(prometheus: str, traffic: None) -> None:
    promql = (
        "sum(rate(vllm:spec_decode_num_accepted_tokens_total[1m]))"
        " / sum(rate(vllm:spec_decode_num_draft_tokens_total[1m]))"
    )
    rate = _poll("acceptance rate (is the worker speculative?)", lambda: _finite_scalar(prometheus, promql),
                 DATA_DEADLINE_S)
    assert 0 <= rate <= 1


@pytest.mark.parametrize(
    ("record", "low", "high"),
    [
        ("model:specgate_time_to_first_token_seconds:p95", 0.0, 60.0),
        ("model:specgate_time_between_tokens_seconds:p50", 0.0, 10.0),
        ("model:specgate_requests_errors:ratio_rate5m", 0.0, 0.0),
        ("model:vllm_spec_decode_acceptance:ratio_rate5m", 0.0, 1.0),
        ("model:specgate_spec_acceptance:ratio_rate5m", 0.0, 1.0),
    ],
)
def test_recording_rules_evaluate_on_live_data(
    prometheus: str, traffic: None, record: str, low: float, high: float
) -> None:
    value = _poll(record, lambda: _finite_scalar(prometheus, f'{record}{{model="{MODEL}"}}'), DATA_DEADLINE_S)
    assert low <= value <= high


def _scrape(url: str) -> dict[str, set[str]]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_every_metric_of_the_dashboard_and_rules_is_on_a_real_scrape(
    gateway_url: str, worker_url: str, traffic: None
) -> None:
    needed = raw_metrics_used() - SYNTHETIC_METRICS - set(ONLY_AFTER_EVENTS)

    def all_present() -> dict[str, set[str]] | None:
        scraped = {**_scrape(gateway_url), **_scrape(worker_url)}
        return scraped if needed <= set(scraped) else None

    try:
        scraped = _poll("metrics on the scrape", all_present, SCRAPE_DEADLINE_S)
    except AssertionError:
        missing = needed - set(_scrape(gateway_url)) - set(_scrape(worker_url))
        raise AssertionError(f"not on a real scrape of gateway + worker: {sorted(missing)}") from None
    for name, labels in VLLM_METRICS.items():
        assert labels <= scraped[name], f"{name} has labels {scraped[name]}, the rules read {labels}"


def test_the_exceptions_are_still_gateway_metrics() -> None:
    from tests.deploy.promql_support import gateway_metrics

    assert set(ONLY_AFTER_EVENTS) <= set(gateway_metrics())
    assert set(ONLY_AFTER_EVENTS) <= raw_metrics_used(), "an exception for a metric nothing reads"


def test_the_rule_files_exist() -> None:
    assert RULE_FILES and all(Path(path).is_file() for path in RULE_FILES)
