"""The engine surface on real vLLM CPU workers: speculation, tensor parallelism, prefix caching, launch errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from engine.launch import WorkerProcess
from engine.supervisor import NO_BINDING
from tests.integration.conftest import running_gateway, running_worker, worker_metric
from tests.support import free_port

MODEL = "demo"
PROMPTS = ["def parse_args(argv):", "class LRUCache:\n    def __init__(self", "import os\nimport sys\n\n", "for i in"]


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _greedy(url: str, prompt: str, tokens: int = 48) -> str:
    reply = _client(url).completions.create(
        model=MODEL, prompt=prompt, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    return reply.choices[0].text


@pytest.fixture(scope="module")
def baseline_worker(models_dir: Path, log_dir: Path) -> Iterator[WorkerProcess]:
    # Beside the session's speculative worker: two workers on two cores, so unpinned (engine.supervisor).
    with running_worker("cpu-baseline", models_dir, log_dir, cpu_bind=NO_BINDING, cpu_threads=1) as worker:
        yield worker


def test_speculative_worker_accepts_draft_tokens_through_the_gateway(gateway_url: str, worker_url: str) -> None:
    drafts_before = worker_metric(worker_url, "vllm:spec_decode_num_draft_tokens_total")
    accepted_before = worker_metric(worker_url, "vllm:spec_decode_num_accepted_tokens_total")
    for prompt in PROMPTS:
        _greedy(gateway_url, prompt, tokens=64)
    drafted = worker_metric(worker_url, "vllm:spec_decode_num_draft_tokens_total") - drafts_before
    accepted = worker_metric(worker_url, "vllm:spec_decode_num_accepted_tokens_total") - accepted_before
    assert drafted > 0
    assert 0 < accepted <= drafted


def test_speculation_does_not_change_greedy_output(gateway_url: str, baseline_worker: WorkerProcess) -> None:
    with running_gateway(baseline_worker.url) as baseline_gateway:
        for prompt in PROMPTS:
            assert _greedy(gateway_url, prompt) == _greedy(baseline_gateway, prompt), prompt


def test_greedy_output_through_spec_aware_equals_the_plain_workers(
    gateway_url: str, worker_url: str, baseline_worker: WorkerProcess
) -> None:
    """A spec_aware gateway over a speculating and a plain worker: every answer as the plain worker alone gives."""
    served_before = {url: worker_metric(url, "vllm:request_success_total") for url in (worker_url, baseline_worker.url)}
    with running_gateway(baseline_worker.url) as plain, \
            running_gateway(worker_url, baseline_worker.url, routing="spec_aware") as mixed:
        for prompt in PROMPTS * 3:
            assert _greedy(mixed, prompt) == _greedy(plain, prompt), prompt
    # Both workers answered some of the spec_aware gateway's requests (unmeasured workers are tried first).
    assert worker_metric(worker_url, "vllm:request_success_total") > served_before[worker_url]
    assert worker_metric(baseline_worker.url, "vllm:request_success_total") > served_before[baseline_worker.url] + 12


def test_repeated_long_prompt_hits_the_prefix_cache(gateway_url: str, worker_url: str) -> None:
    long_prompt = "\n".join(f"def handler_{i}(request, response):\n    return response" for i in range(60))
    hits_before = worker_metric(worker_url, "vllm:prefix_cache_hits_total")
    _greedy(gateway_url, long_prompt, tokens=4)
    _greedy(gateway_url, long_prompt, tokens=4)
    hit_tokens = worker_metric(worker_url, "vllm:prefix_cache_hits_total") - hits_before
    assert hit_tokens >= 256, f"only {hit_tokens} prompt tokens came from the prefix cache"


def test_tensor_parallel_2_worker_serves_through_the_gateway(models_dir: Path, log_dir: Path) -> None:
    with running_worker("cpu-tp2", models_dir, log_dir) as worker, running_gateway(worker.url) as gateway:
        stream = _client(gateway).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "def main():"}], max_tokens=16, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
        log = worker.log_path.read_text(errors="replace")
        assert "world_size=2" in log or "tensor_parallel_size=2" in log


def test_a_worker_that_cannot_start_reports_its_log_tail(tmp_path: Path) -> None:
    from engine.launch import EngineStartError
    from engine.profiles import WorkerCommand

    command = WorkerCommand([sys.executable, "-c", "import sys; print('bad model path'); sys.exit(3)"], {})
    worker = WorkerProcess(command, free_port(), tmp_path / "w.log", name="broken")
    worker.start()
    with pytest.raises(EngineStartError) as caught:
        worker.wait_ready(30)
    assert "exited with code 3" in str(caught.value)
    assert "bad model path" in str(caught.value)
    assert os.path.exists(tmp_path / "w.log")


def test_up_fails_with_the_log_tail_when_the_draft_cannot_load(models_dir: Path, tmp_path: Path) -> None:
    """A draft whose weights are corrupt: `specgate up` exits 2 with vLLM's own last lines, never hangs."""
    import shutil
    import subprocess

    draft = tmp_path / "broken-draft"
    shutil.copytree(models_dir / "demo-draft", draft)
    for weights in draft.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    profile = tmp_path / "broken.yaml"
    profile.write_text(
        (Path(__file__).parents[2] / "configs/engine/cpu-demo.yaml").read_text()
        .replace("{models_dir}/demo-draft", str(draft)).replace("{models_dir}", str(models_dir))
    )
    finished = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "up", "--profile", str(profile), "--workers", "1",
         "--port", str(free_port()), "--worker-port", str(free_port()), "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=600,
    )
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert "exited with code" in finished.stderr and "last log lines" in finished.stderr
    # The tail is the worker's own: it names what failed to load.
    assert "safetensors" in finished.stderr.lower() or "broken-draft" in finished.stderr, finished.stderr[-3000:]
