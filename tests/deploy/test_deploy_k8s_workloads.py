"""What deploy/kubernetes' gateway, workers and multi-node Ray example rely on: probes, discovery, GPUs, budgets."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from engine.profiles import EngineProfile, find_profile, render
from tests.deploy.k8s_support import containers, env_of, find_one, manifests, pod_labels, selects

WORKER_PORT = 8100


def _profile_of(args: list[str]) -> EngineProfile:
    from gateway.cli import build_parser

    parsed = build_parser().parse_args(args)
    assert parsed.command == "engine"
    assert parsed.port == WORKER_PORT
    assert parsed.host == "0.0.0.0"
    return find_profile(parsed.profile)


def _gpus(container: dict[str, Any]) -> int:
    resources = container["resources"]
    requested = int(resources["requests"]["nvidia.com/gpu"])
    assert int(resources["limits"]["nvidia.com/gpu"]) == requested, "extended resources need requests == limits"
    return requested


# --- gateway -------------------------------------------------------------------------------------------


def test_gateway_probes_ready_and_health() -> None:
    container = containers(find_one(manifests(), "Deployment", "specgate-gateway"))[0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8000}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_gateway_runs_as_non_root_and_outlasts_its_drain() -> None:
    deployment = find_one(manifests(), "Deployment", "specgate-gateway")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["terminationGracePeriodSeconds"] > 30, "uvicorn drains streams for 30 s after SIGTERM"


def test_gateway_discovers_the_worker_pods_through_the_headless_service() -> None:
    docs = manifests()
    gateway = containers(find_one(docs, "Deployment", "specgate-gateway"))[0]
    statefulset = find_one(docs, "StatefulSet", "specgate-worker")
    service = find_one(docs, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "only a headless Service resolves to every pod"
    assert env_of(gateway)["SPECGATE_WORKERS"] == f"dns+http://{service['metadata']['name']}:{WORKER_PORT}"
    from gateway.settings import GatewaySettings

    assert GatewaySettings(discovery_interval_s=env_of(gateway)["SPECGATE_DISCOVERY_INTERVAL_S"]).discovery_interval_s


def test_gateway_replicas_share_limits_through_the_redis_service() -> None:
    docs = manifests()
    deployment = find_one(docs, "Deployment", "specgate-gateway")
    assert deployment["spec"]["replicas"] > 1
    url = env_of(containers(deployment)[0])["SPECGATE_REDIS_URL"]
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    service = find_one(docs, "Service", host)
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert selects(service["spec"]["selector"], pod_labels(find_one(docs, "Deployment", host)))


def test_pod_disruption_budgets_cover_gateway_and_workers() -> None:
    docs = manifests()
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for kind, name in (("Deployment", "specgate-gateway"), ("StatefulSet", "specgate-worker")):
        workload = find_one(docs, kind, name)
        covering = [b for b in budgets if selects(b["spec"]["selector"], pod_labels(workload))]
        assert len(covering) == 1, f"{kind}/{name} needs one PodDisruptionBudget"
        spec = covering[0]["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
        if "minAvailable" in spec:
            assert spec["minAvailable"] < workload["spec"]["replicas"], "a budget that blocks every drain"


# --- workers ---------------------------------------------------------------------------------------------


def test_workers_are_a_statefulset_behind_a_headless_service() -> None:
    docs = manifests()
    statefulset = find_one(docs, "StatefulSet", "specgate-worker")
    service = find_one(docs, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(statefulset))
    assert selects(statefulset["spec"]["selector"], pod_labels(statefulset))
    container = containers(statefulset)[0]
    assert {port["containerPort"] for port in container["ports"]} == {WORKER_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe


def test_worker_gpus_match_the_profile_parallelism() -> None:
    container = containers(find_one(manifests(), "StatefulSet", "specgate-worker"))[0]
    profile = _profile_of(container["args"])
    assert profile.device == "gpu"
    assert profile.speculative is not None
    assert _gpus(container) == profile.tensor_parallel_size * profile.pipeline_parallel_size
    render(profile, host="0.0.0.0", port=WORKER_PORT, models_dir=Path("/models"), python=sys.executable)


def test_worker_shared_memory_and_cache_are_mounted() -> None:
    statefulset = find_one(manifests(), "StatefulSet", "specgate-worker")
    mounts = {m["mountPath"]: m["name"] for m in containers(statefulset)[0]["volumeMounts"]}
    assert "/dev/shm" in mounts
    claims = {claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]}
    assert mounts[env_of(containers(statefulset)[0])["HF_HOME"]] in claims


# --- multi-node Ray -------------------------------------------------------------------------------------


def _ray_scripts() -> dict[str, str]:
    scripts: dict[str, str] = find_one(manifests("multinode"), "ConfigMap", "specgate-ray-scripts")["data"]
    return scripts


def test_ray_example_serves_the_ray_profile_over_all_gpus() -> None:
    docs = manifests("multinode")
    head = find_one(docs, "StatefulSet", "specgate-ray-head")
    worker = find_one(docs, "StatefulSet", "specgate-ray-worker")
    engine_line = next(line for line in _ray_scripts()["head.sh"].splitlines() if "specgate engine" in line)
    profile = _profile_of(shlex.split(engine_line.split("exec specgate ", 1)[1]))
    assert profile.distributed_executor_backend == "ray"
    total = _gpus(containers(head)[0]) + worker["spec"]["replicas"] * _gpus(containers(worker)[0])
    assert total == profile.tensor_parallel_size * profile.pipeline_parallel_size
    assert env_of(containers(head)[0])["RAY_CLUSTER_GPUS"] == str(total)
    for statefulset in (head, worker):
        assert env_of(containers(statefulset)[0])["GPUS_PER_NODE"] == str(_gpus(containers(statefulset)[0]))


def test_ray_nodes_find_the_head_and_land_on_distinct_nodes() -> None:
    docs = manifests("multinode")
    head = find_one(docs, "StatefulSet", "specgate-ray-head")
    worker = find_one(docs, "StatefulSet", "specgate-ray-worker")
    service = find_one(docs, "Service", head["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True, "the head is not ready until the workers joined"
    assert worker["spec"]["serviceName"] == service["metadata"]["name"]
    assert env_of(containers(worker)[0])["RAY_HEAD"] == f"specgate-ray-head-0.{service['metadata']['name']}"
    for statefulset in (head, worker):
        assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(statefulset))
        anti = statefulset["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        term = anti["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert selects(term["labelSelector"], pod_labels(head))
        assert selects(term["labelSelector"], pod_labels(worker))


def test_ray_scripts_are_valid_shell_and_python(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    for name, script in _ray_scripts().items():
        path = tmp_path / name
        path.write_text(script)
        result = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True, timeout=10, check=False)
        assert result.returncode == 0, result.stderr
        for embedded in re.findall(r"<<'PY'\n(.*?)\nPY\n", script, flags=re.DOTALL):
            compile(embedded, f"{name} (python)", "exec")


def test_multinode_gateway_points_at_the_ray_head() -> None:
    docs = manifests("multinode")
    gateway = containers(find_one(docs, "Deployment", "specgate-gateway"))[0]
    service = find_one(docs, "StatefulSet", "specgate-ray-head")["spec"]["serviceName"]
    assert env_of(gateway)["SPECGATE_WORKERS"] == f"http://specgate-ray-head-0.{service}:{WORKER_PORT}"
