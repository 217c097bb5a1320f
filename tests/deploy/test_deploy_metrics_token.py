"""The /metrics token through Compose: every gateway and Prometheus get it, Prometheus sends it from a file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import PROMETHEUS_CONFIG, rendered_services, service_dockerfile

# Characters a careless entrypoint would split, glob or expand.
METRICS_TOKEN = "scrape s3cret;*$HOME"


def _token_env_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "token.env"
    path.write_text(f"SPECGATE_METRICS_TOKEN='{token}'\n")  # single quotes: dotenv takes it literally
    return path


def _gateway_scrape_job() -> dict[str, Any]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job: dict[str, Any] = next(job for job in config["scrape_configs"] if job["job_name"] == "specgate-gateway")
    return job


@pytest.mark.parametrize("stack", ["gpu", "cpu"])
@pytest.mark.parametrize("token", [METRICS_TOKEN, ""])
def test_every_gateway_and_prometheus_get_the_metrics_token(stack: str, token: str, tmp_path: Path) -> None:
    services = rendered_services(stack, _token_env_file(tmp_path, token))
    gateways = [name for name, spec in services.items() if service_dockerfile(spec) == "Dockerfile.gateway"]
    assert gateways == ["gateway"]
    for name in [*gateways, "prometheus"]:
        # `compose config` prints the model re-escaped ($$ for a literal $); the container gets one $.
        assert services[name]["environment"]["SPECGATE_METRICS_TOKEN"].replace("$$", "$") == token, name


def test_prometheus_sends_the_gateway_token_from_a_file() -> None:
    authorization = _gateway_scrape_job()["authorization"]
    assert authorization.get("type", "Bearer").lower() == "bearer"
    assert "credentials" not in authorization, "the token belongs in .env, not in the config"
    assert authorization["credentials_file"].startswith("/tmp/"), "the only writable place in the container"


@pytest.mark.parametrize("token", [METRICS_TOKEN, ""])
def test_prometheus_entrypoint_writes_the_token_file_and_execs_prometheus(
    token: str, tmp_path: Path, empty_env_file: Path
) -> None:
    """Runs the prometheus service's entrypoint here, with its paths moved under tmp_path."""
    prometheus = rendered_services("cpu", empty_env_file)["prometheus"]
    # `compose config` prints the model re-escaped ($$ for a literal $); the container gets one $.
    entrypoint = [part.replace("$$", "$") for part in prometheus["entrypoint"]]
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    assert entrypoint[3:] == ["--"], "$0 is --, so the service's command flags are all of $@"
    script = entrypoint[2]
    token_file = _gateway_scrape_job()["authorization"]["credentials_file"]
    assert f"> {token_file}" in script
    assert 'exec /bin/prometheus "$@"' in script

    token_dir = tmp_path / "token-dir"
    argv_file = tmp_path / "argv"
    fake_prometheus = tmp_path / "prometheus"
    fake_prometheus.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {argv_file}\n")
    fake_prometheus.chmod(0o755)
    token_parent, token_name = token_file.rsplit("/", 1)
    local = script.replace(token_parent, str(token_dir)).replace("/bin/prometheus", str(fake_prometheus))
    env = {"PATH": os.environ.get("PATH", ""), "SPECGATE_METRICS_TOKEN": token}
    result = subprocess.run(["/bin/sh", "-c", local, "--", *prometheus["command"]],
                            capture_output=True, text=True, timeout=10, env=env, check=False)
    assert result.returncode == 0, result.stderr
    written = token_dir / token_name
    assert written.read_text() == token, "exactly the token: Prometheus trims whitespace, nothing else"
    assert written.stat().st_mode & 0o077 == 0, "readable by prometheus' own user only"
    assert argv_file.read_text().splitlines() == prometheus["command"]


@pytest.mark.anyio
async def test_an_empty_token_file_scrapes_the_open_gateway() -> None:
    """Unset, compose passes "" to the gateway and Prometheus sends `Bearer ` (its empty file): /metrics
    stays open and ignores the header. Set, both get the same token."""
    from tests.unit.fakes import ScriptedWorker, gateway_client, mock_client, settings_for

    worker = ScriptedWorker()
    for token, accepted, refused in (("", "", None), (METRICS_TOKEN, METRICS_TOKEN, "")):
        settings = settings_for(worker.url, metrics_token=token)
        async with gateway_client(settings, mock_client(worker)) as (client, _):
            scrape = await client.get("/metrics", headers={"authorization": f"Bearer {accepted}"})
            assert scrape.status_code == 200, token
            if refused is not None:
                refusal = await client.get("/metrics", headers={"authorization": f"Bearer {refused}"})
                assert refusal.status_code == 401
