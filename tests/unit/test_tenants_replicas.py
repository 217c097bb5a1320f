"""Two gateway processes sharing one real redis-server enforce one key's limits together, called with the
official openai client in front of the fake engine (a test double for a vLLM worker)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from loadtest.fake_config import FakeEngineConfig
from loadtest.fake_engine import run_in_thread
from tests.support import free_port, wait_until

SECRET = "sk-shared-secret"
RPM = 6


@pytest.fixture(scope="module")
def replicas(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two gateways on one Redis, one key: `shared` (RPM 6), `single` (one stream at a time)."""
    workdir = tmp_path_factory.mktemp("replicas")
    keys = workdir / "keys.yaml"
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    single = hashlib.sha256(b"sk-single").hexdigest()
    keys.write_text(json.dumps({"keys": [
        {"name": "shared", "sha256": digest, "rpm": RPM},
        {"name": "single", "sha256": single, "max_concurrent": 1},
        {"name": "ops", "sha256": hashlib.sha256(b"sk-ops").hexdigest(), "admin": True},
    ]}))
    config = FakeEngineConfig(ttft_s=0.01, gap_s=0.02, output_len=40)
    with run_in_thread(config) as engine_url:
        processes, urls = [], []
        env = {**os.environ, "SPECGATE_KEYS_FILE": str(keys), "SPECGATE_REDIS_URL": redis_url,
               "SPECGATE_REQUEST_LOG": "false"}
        for index in range(2):
            port = free_port()
            log = (workdir / f"gateway-{index}.log").open("wb")
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "gateway", "--workers", engine_url, "--port", str(port),
                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env))
            urls.append(f"http://127.0.0.1:{port}")
        try:
            for url in urls:
                assert wait_until(lambda url=url: _ready(url), timeout_s=60), f"{url} not ready"
            yield urls
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _client(url: str, key: str, retries: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=retries, timeout=30)


def test_two_replicas_admit_exactly_the_rpm_between_them(replicas: list[str]) -> None:
    clients = [_client(url, SECRET, retries=0) for url in replicas]
    admitted, refused = 0, []
    for index in range(2 * RPM):
        try:
            clients[index % 2].chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            admitted += 1
        except openai.RateLimitError as exc:
            refused.append(exc)
    assert admitted == RPM, "one limit across both replicas, not one per replica"
    assert len(refused) == RPM
    headers = refused[0].response.headers
    assert headers["x-ratelimit-limit-requests"] == str(RPM) and headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 60
    usage = httpx.get(replicas[1] + "/admin/usage", headers={"authorization": "Bearer sk-ops"}).json()
    assert usage["keys"]["shared"]["requests"] == RPM and usage["keys"]["shared"]["refused"] == RPM


def test_the_openai_client_waits_the_retry_after_and_then_gets_its_answer(replicas: list[str]) -> None:
    """`single` may hold one stream: a second call on the other replica is refused until the first ends, and the
    client, honouring Retry-After, gets its answer on a retry."""
    holding = _client(replicas[0], "sk-single", retries=0)
    stream = holding.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=40, stream=True)
    first = next(iter(stream))  # the stream is open: its concurrency slot is held
    assert first.choices is not None

    def finish() -> None:
        for _ in stream:
            pass

    reader = threading.Thread(target=finish)
    started = time.monotonic()
    reader.start()  # ends about 0.8 s from now
    refused_once = _client(replicas[1], "sk-single", retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        refused_once.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2)
    assert refused.value.response.json()["error"]["message"].endswith("s"), refused.value.response.text
    patient = _client(replicas[1], "sk-single", retries=3)
    answer = patient.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2)
    waited = time.monotonic() - started
    reader.join(timeout=30)
    assert answer.choices[0].message.content, "answered after waiting"
    assert waited >= 0.5, f"answered after {waited:.2f}s: it cannot have waited for the first stream to end"
