"""Engine profiles render to the expected vLLM arguments; bad profiles fail readably."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.profiles import ProfileError, find_profile, load_profile, profiles_dir, render
from engine.supervisor import NO_BINDING, cpu_binding, cpu_threads

MODELS = Path("/models")
SHIPPED = sorted(path.stem for path in profiles_dir().glob("*.yaml"))


def _flags(argv: list[str]) -> dict[str, str | None]:
    """--flag value pairs after the module name (None for switches; several values joined by a space)."""
    flags: dict[str, str | None] = {}
    rest = argv[argv.index("vllm.entrypoints.openai.api_server") + 1 :]
    index = 0
    while index < len(rest):
        flag, index = rest[index], index + 1
        values = []
        while index < len(rest) and not rest[index].startswith("--"):
            values.append(rest[index])
            index += 1
        flags[flag] = " ".join(values) if values else None
    return flags


def test_the_promised_profiles_ship() -> None:
    for name in ("cpu-demo", "cpu-baseline", "cpu-tp2", "gpu-llama3.1-8b-spec", "gpu-llama3.1-8b-eagle3",
                 "gpu-llama3.1-70b-tp4-spec", "gpu-ray-2node"):
        assert name in SHIPPED


def test_cpu_demo_renders_speculative_decoding_with_the_distilled_draft() -> None:
    command = render(find_profile("cpu-demo"), host="127.0.0.1", port=8100, models_dir=MODELS, python="py")
    assert command.argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    flags = _flags(command.argv)
    assert flags["--model"] == "/models/demo-target"
    assert flags["--served-model-name"] == "demo"
    assert flags["--port"] == "8100"
    assert "--enable-prefix-caching" in flags
    assert json.loads(flags["--speculative-config"] or "") == {
        "model": "/models/demo-draft", "num_speculative_tokens": 3,
    }
    assert command.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert command.env["HF_HUB_OFFLINE"] == "1"


def test_cpu_baseline_is_cpu_demo_without_speculation() -> None:
    demo = _flags(render(find_profile("cpu-demo"), host="h", port=1, models_dir=MODELS).argv)
    base = _flags(render(find_profile("cpu-baseline"), host="h", port=1, models_dir=MODELS).argv)
    demo.pop("--speculative-config")
    assert demo.pop("--per-request-spec-decode-metrics") == "summary"  # speculation reported per request
    assert base == demo


def test_gpu_eagle3_profile_renders_vllms_eagle3_method_with_its_head() -> None:
    flags = _flags(render(find_profile("gpu-llama3.1-8b-eagle3"), host="0.0.0.0", port=8100, models_dir=MODELS).argv)
    spec = json.loads(flags["--speculative-config"] or "")
    assert spec == {"method": "eagle3", "model": "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", "num_speculative_tokens": 3}
    assert flags["--model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert flags["--per-request-spec-decode-metrics"] == "summary"


def test_default_profile_serves_smollm2_under_the_demo_alias_and_its_draft_profile_speculates() -> None:
    from gateway.cli import DEFAULT_PROFILE

    assert find_profile(DEFAULT_PROFILE).public_name == "smollm2"
    assert find_profile(DEFAULT_PROFILE).speculative is None
    profile = find_profile("cpu-smollm2-eagle3")
    flags = _flags(render(profile, host="h", port=1, models_dir=MODELS).argv)
    assert profile.public_name == "smollm2"
    assert flags["--served-model-name"] == "smollm2 demo"
    assert flags["--model"] == f"{MODELS}/smollm2-135m-instruct"
    # float32: bf16 rounding lets a verified batch and a single decode step pick different greedy tokens.
    assert flags["--dtype"] == "float32"
    spec = json.loads(flags["--speculative-config"] or "")
    assert spec == {"method": "eagle3", "model": f"{MODELS}/smollm2-135m-eagle3", "num_speculative_tokens": 3}


def test_smollm2_profiles_differ_only_in_speculation() -> None:
    rendered = {name: _flags(render(find_profile(name), host="h", port=1, models_dir=MODELS).argv)
                for name in ("cpu-smollm2", "cpu-smollm2-eagle3", "cpu-smollm2-ngram")}
    for flags in rendered.values():
        flags.pop("--speculative-config", None)
        flags.pop("--per-request-spec-decode-metrics", None)
    assert rendered["cpu-smollm2"] == rendered["cpu-smollm2-eagle3"] == rendered["cpu-smollm2-ngram"]
    ngram = json.loads(_flags(render(find_profile("cpu-smollm2-ngram"), host="h", port=1,
                                     models_dir=MODELS).argv)["--speculative-config"] or "")
    assert ngram["method"] == "ngram"


def test_profiles_name_the_model_builds_they_need() -> None:
    from engine.model_builds import builds_for

    assert builds_for(find_profile("cpu-smollm2-eagle3")) == ["smollm2", "smollm2-eagle3"]
    assert builds_for(find_profile("cpu-smollm2")) == ["smollm2"]
    assert builds_for(find_profile("cpu-demo")) == ["demo"]
    assert builds_for(find_profile("gpu-llama3.1-8b-eagle3")) == []


def test_cpu_tp2_binds_one_rank_per_core() -> None:
    command = render(find_profile("cpu-tp2"), host="h", port=1, models_dir=MODELS)
    assert _flags(command.argv)["--tensor-parallel-size"] == "2"
    assert command.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_gpu_8b_profile_uses_a_1b_draft_and_gpu_memory_budget() -> None:
    command = render(find_profile("gpu-llama3.1-8b-spec"), host="0.0.0.0", port=8100, models_dir=MODELS)
    flags = _flags(command.argv)
    assert flags["--model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert flags["--gpu-memory-utilization"] == "0.9"
    assert flags["--scheduling-policy"] == "priority"
    assert "--enable-chunked-prefill" in flags
    spec = json.loads(flags["--speculative-config"] or "")
    assert spec == {"model": "meta-llama/Llama-3.2-1B-Instruct", "num_speculative_tokens": 4}
    assert "VLLM_CPU_KVCACHE_SPACE" not in command.env


def test_gpu_70b_profile_is_tensor_parallel_4_with_a_single_gpu_draft() -> None:
    flags = _flags(render(find_profile("gpu-llama3.1-70b-tp4-spec"), host="h", port=1, models_dir=MODELS).argv)
    assert flags["--tensor-parallel-size"] == "4"
    assert json.loads(flags["--speculative-config"] or "")["draft_tensor_parallel_size"] == 1


def test_ray_profile_spans_two_nodes_with_pipeline_parallelism() -> None:
    flags = _flags(render(find_profile("gpu-ray-2node"), host="h", port=1, models_dir=MODELS).argv)
    assert flags["--distributed-executor-backend"] == "ray"
    assert (flags["--tensor-parallel-size"], flags["--pipeline-parallel-size"]) == ("8", "2")
    assert json.loads(flags["--speculative-config"] or "")["method"] == "ngram"


@pytest.fixture(scope="module")
def vllm_flags() -> set[str]:
    """Every flag the installed vLLM's server accepts, read from its own --help (once)."""
    import re
    import subprocess
    import sys

    pytest.importorskip("vllm", reason="needs the vLLM engine installed")
    help_text = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--help=all"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    return set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", help_text))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_rendered_flag_is_one_vllm_knows(name: str, vllm_flags: set[str]) -> None:
    argv = render(find_profile(name), host="h", port=1, models_dir=MODELS).argv
    unknown = [flag for flag in _flags(argv) if flag not in vllm_flags]
    assert not unknown, f"{name} renders flags this vLLM does not accept: {unknown}"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("device: cpu\nmodel: m\ntensor_parallel_size: 0\n", "field 'tensor_parallel_size'"),
        ("device: cpu\nmodel: m\nmax_num_seq: 4\n", "field 'max_num_seq'"),
        ("device: tpu\nmodel: m\n", "field 'device'"),
        ("device: cpu\nmodel: m\ngpu_memory_utilization: 0.9\n", "use kv_cache_space_gib on cpu"),
        ("device: cpu\nmodel: m\nspeculative: {method: draft_model}\n", "needs a 'model'"),
        ("device: cpu\nmodel: m\ntensor_parallel_size: 2\ncpu_threads_bind: '0'\n", "one core list per"),
        ("- just\n- a list\n", "YAML mapping"),
        ("device: [cpu\n", "not valid YAML"),
    ],
)
def test_bad_profile_names_file_field_and_reason(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert str(path) in str(caught.value)
    assert needle in str(caught.value)


def test_missing_profile_is_a_profile_error() -> None:
    with pytest.raises(ProfileError, match="no such engine profile"):
        find_profile("no-such-profile")


def test_extra_args_and_env_pass_through(tmp_path: Path) -> None:
    path = _write(tmp_path, "device: gpu\nmodel: m\nextra_args: ['--enforce-eager']\nenv: {NCCL_DEBUG: INFO}\n")
    command = render(load_profile(path), host="h", port=1, models_dir=MODELS)
    assert command.argv[-1] == "--enforce-eager"
    assert command.env == {"NCCL_DEBUG": "INFO"}


def test_cpu_workers_get_their_own_cores_while_one_is_left_over(monkeypatch: pytest.MonkeyPatch) -> None:
    demo, tp2 = find_profile("cpu-demo"), find_profile("cpu-tp2")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [cpu_binding(i, demo, 3) for i in range(3)] == ["0", "1", "2"]
    assert [cpu_binding(i, tp2, 2) for i in range(2)] == ["0|1", "2|3"]
    assert cpu_threads(demo, 3) is None
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cpu_binding(0, demo, 1) == "0"
    assert [cpu_binding(i, demo, 2) for i in range(2)] == [NO_BINDING, NO_BINDING]
    assert cpu_threads(demo, 2) == 1
    assert cpu_binding(0, tp2, 1) == "0|1"
    assert cpu_binding(0, find_profile("gpu-llama3.1-8b-spec"), 1) is None


def test_unpinned_workers_get_their_share_of_threads() -> None:
    command = render(find_profile("cpu-baseline"), host="h", port=1, models_dir=MODELS, cpu_bind=NO_BINDING,
                     cpu_threads=1)
    assert command.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert command.env["OMP_NUM_THREADS"] == "1"
