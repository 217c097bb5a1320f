"""The `specgate` command line, and the gateway's independence from vLLM and torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.cli import main


def _loaded_after_import(modules: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` a fresh interpreter has loaded after importing `modules`."""
    code = f"import sys, {modules}; print(','.join(m for m in {watched!r} if m in sys.modules))"
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return [name for name in finished.stdout.strip().split(",") if name]


def test_gateway_imports_neither_vllm_nor_torch() -> None:
    modules = "gateway.app, gateway.cli, gateway.server, engine.profiles, engine.launch, engine.supervisor"
    assert _loaded_after_import(modules, ("torch", "vllm", "transformers")) == []


def test_the_gateway_has_one_worker_client_and_imports_no_other() -> None:
    assert _loaded_after_import("gateway.app, gateway.server", ("aiohttp", "httpcore", "httpx_aiohttp", "httpx")) == []


def test_render_prints_environment_then_the_vllm_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--profile", "cpu-tp2", "--models-dir", "/m"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "VLLM_CPU_OMP_THREADS_BIND='0|1'" in lines
    assert lines[-1].startswith("python -m vllm.entrypoints.openai.api_server --model /m/demo-target")


def test_gateway_without_workers_says_how_to_give_them(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPECGATE_WORKERS", raising=False)
    assert main(["gateway"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_a_bad_profile_is_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--profile", "no-such-profile"]) == 2
    assert capsys.readouterr().err.startswith("specgate: ")


def test_models_path_honours_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECGATE_MODELS_DIR", "/somewhere/models")
    assert main(["models", "path"]) == 0
    assert capsys.readouterr().out.strip() == "/somewhere/models"


def test_the_routing_flag_names_every_policy() -> None:
    from gateway.cli import ROUTING_POLICIES
    from gateway.workers.routing import LEARNING_POLICIES, POLICIES

    assert sorted(ROUTING_POLICIES) == sorted([*POLICIES, *LEARNING_POLICIES])
