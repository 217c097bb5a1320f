"""`compose config` on both stacks: a plain `docker compose up` is the GPU stack, `-f docker-compose.cpu.yml`
the CPU one; a real Compose accepts each, with and without .env.example, and refuses a broken file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.support import (
    COMPOSE_FILE,
    COMPOSE_FILES,
    CPU_COMPOSE_FILE,
    ENV_EXAMPLE,
    ROOT,
    STACK_SERVICES,
    compose_binary,
    compose_config,
    env_example,
    rendered_services,
    service_dockerfile,
)


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []) or []
    )
    return [device for device in devices if device.get("driver") == "nvidia" or "gpu" in device.get("capabilities", [])]


@pytest.mark.parametrize("stack", ["gpu", "cpu"])
@pytest.mark.parametrize("env", ["defaults", ".env.example"])
def test_compose_config_accepts_each_stack(stack: str, env: str, empty_env_file: Path) -> None:
    env_file = ENV_EXAMPLE if env == ".env.example" else empty_env_file
    services = rendered_services(stack, env_file)
    assert set(services) == STACK_SERVICES[stack]
    for name, service in services.items():
        assert not service.get("profiles"), f"{name} has a profile, so a plain `up` would not start it"
        assert service.get("restart") in ("unless-stopped", "always", "on-failure", "no"), name


def test_plain_compose_up_selects_the_gpu_stack(empty_env_file: Path) -> None:
    """No .env, no flag, no profile: `docker compose up` starts exactly the GPU services."""
    result = compose_config("config", "--services", env_file=empty_env_file)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == STACK_SERVICES["gpu"]
    assert "COMPOSE_PROFILES" not in env_example(), "the stack is chosen by the file, not by .env"


def test_plain_compose_up_in_the_project_directory_is_the_gpu_stack(tmp_path: Path) -> None:
    """What `docker compose up` reads with no -f and no .env: docker-compose.yml, and only it."""
    project = tmp_path / "project"
    project.mkdir()
    for path in (COMPOSE_FILE, CPU_COMPOSE_FILE):
        shutil.copy(path, project / path.name)
    clean_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run([compose_binary(), "config", "--services"], cwd=project, capture_output=True, text=True,
                            timeout=60, env=clean_env, check=False)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == STACK_SERVICES["gpu"]


def test_gpu_stack_reserves_gpus_for_its_workers(empty_env_file: Path) -> None:
    services = rendered_services("gpu", empty_env_file)
    reserving = {name for name, service in services.items() if _gpu_devices(service)}
    assert reserving == {"worker-0", "worker-1"}


@pytest.mark.parametrize("env", ["defaults", ".env.example"])
def test_cpu_stack_reserves_no_gpu_and_builds_no_gpu_image(env: str, empty_env_file: Path) -> None:
    services = rendered_services("cpu", ENV_EXAMPLE if env == ".env.example" else empty_env_file)
    for name, service in services.items():
        assert not _gpu_devices(service), f"{name} reserves a GPU"
        assert "deploy" not in service, name
        assert service_dockerfile(service) != "Dockerfile.gpu", name
        assert not (service.get("image") or "").startswith("specgate-worker-gpu"), name
    assert service_dockerfile(services["worker-cpu"]) == "Dockerfile.cpu"


def _without(service: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in service.items() if key not in keys}


def test_cpu_stack_reuses_the_gpu_stacks_gateway_prometheus_and_grafana(empty_env_file: Path) -> None:
    """`extends` gives the CPU stack the same services; only the gateway's workers and dependencies differ."""
    gpu = rendered_services("gpu", empty_env_file)
    cpu = rendered_services("cpu", empty_env_file)
    assert cpu["prometheus"] == gpu["prometheus"]
    assert cpu["grafana"] == gpu["grafana"]
    differing = ("environment", "depends_on")
    assert _without(cpu["gateway"], *differing) == _without(gpu["gateway"], *differing)
    assert _without(cpu["gateway"]["environment"], "SPECGATE_WORKERS") == _without(
        gpu["gateway"]["environment"], "SPECGATE_WORKERS"
    )
    assert cpu["gateway"]["environment"]["SPECGATE_WORKERS"] == "http://worker-cpu:8100"
    # The GPU gateway's worker-0/worker-1 must not leak in: Compose would refuse them, or wait for ever.
    assert {name: dep["condition"] for name, dep in cpu["gateway"]["depends_on"].items()} == {
        "worker-cpu": "service_healthy"
    }
    assert {name: dep["condition"] for name, dep in cpu["grafana"]["depends_on"].items()} == {
        "prometheus": "service_healthy"
    }


def test_cpu_worker_keeps_what_vllms_cpu_backend_needs(empty_env_file: Path) -> None:
    worker = rendered_services("cpu", empty_env_file)["worker-cpu"]
    assert "SYS_NICE" in worker["cap_add"]
    assert "seccomp=unconfined" in worker["security_opt"]
    assert int(worker["shm_size"]) >= 1 << 30
    assert worker["command"][worker["command"].index("--profile") + 1] == "cpu-smollm2"
    assert worker["depends_on"]["models"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize(
    ("stack", "original", "broken"),
    [
        ("gpu", "healthcheck: *worker-healthcheck", "healthchek: {}"),
        ("cpu", "shm_size: 1gb", "shm_sise: 1gb"),
    ],
)
def test_compose_config_rejects_a_broken_file(
    stack: str, original: str, broken: str, tmp_path: Path, empty_env_file: Path
) -> None:
    """The validation above can fail: a misspelled key is refused (the CPU file beside the GPU file it extends)."""
    for path in COMPOSE_FILES.values():
        shutil.copy(path, tmp_path / path.name)
    target = tmp_path / COMPOSE_FILES[stack].name
    text = target.read_text()
    assert original in text
    target.write_text(text.replace(original, broken, 1))
    clean_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(
        [compose_binary(), "--project-directory", str(ROOT), "-f", str(target), "--env-file", str(empty_env_file),
         "config", "-q"],
        capture_output=True, text=True, timeout=60, env=clean_env, check=False,
    )
    assert result.returncode != 0
    assert broken.split(":")[0] in result.stderr
