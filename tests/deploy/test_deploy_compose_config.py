"""`compose config` on docker-compose.yml: a real Compose accepts each stack and its profiles, refuses a broken file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.deploy.support import COMPOSE_FILE, ENV_EXAMPLE, compose_binary, compose_config, env_example


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("gpu", {"worker-0", "worker-1", "gateway", "prometheus", "grafana"}),
        ("cpu", {"models", "worker-cpu", "gateway-cpu", "prometheus", "grafana"}),
    ],
)
@pytest.mark.parametrize("env", ["defaults", ".env.example"])
def test_compose_config_accepts_each_stack(profile: str, expected: set[str], env: str, empty_env_file: Path) -> None:
    env_file = ENV_EXAMPLE if env == ".env.example" else empty_env_file
    result = compose_config("--profile", profile, "config", "--format", "json", env_file=env_file)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert set(config["services"]) == expected
    for name, service in config["services"].items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure", "no"), name


def test_compose_up_without_a_profile_selects_nothing(empty_env_file: Path) -> None:
    """So a CPU host never starts GPU workers by accident; .env.example selects gpu for `docker compose up`."""
    result = compose_config("config", "--services", env_file=empty_env_file)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
    assert env_example()["COMPOSE_PROFILES"] == "gpu"


def test_compose_cpu_flag_overrides_the_env_example_profile() -> None:
    result = compose_config("--profile", "cpu", "config", "--services", env_file=ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "worker-0" not in result.stdout.split()
    assert "worker-cpu" in result.stdout.split()


def test_compose_config_rejects_a_broken_file(tmp_path: Path, empty_env_file: Path) -> None:
    """The validation above can fail: a misspelled key is refused."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("healthcheck: *worker-healthcheck", "healthchek: {}", 1))
    clean_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(
        [compose_binary(), "-f", str(broken), "--env-file", str(empty_env_file), "--profile", "gpu", "config", "-q"],
        capture_output=True, text=True, timeout=60, env=clean_env, check=False,
    )
    assert result.returncode != 0
    assert "healthchek" in result.stderr
