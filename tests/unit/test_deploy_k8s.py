"""deploy/kubernetes: rendered with kustomize, validated offline against Kubernetes' JSON schemas, and checked
for what the gateway, the workers, the autoscaler and the Ray example rely on."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.profiles import EngineProfile, find_profile, render
from tests.deploy_support import KUBERNETES_DIR, known_metrics

KUSTOMIZATIONS = ("", "multinode", "monitoring")
# Kinds from CRDs, which Kubernetes' own schemas do not cover; checked structurally below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
WORKER_PORT = 8100

Manifest = dict[str, Any]


def _load_kustomization(directory: Path, accumulated: list[Manifest] | None = None) -> list[Manifest]:
    """A reading of kustomization.yaml without kubectl: resources, components, namespace, image tags, JSON6902
    patches. A Component (kind: Component) acts, like kustomize's, on what its parent has accumulated."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[Manifest] = [] if accumulated is None else accumulated
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs += _load_kustomization(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for component in kustomization.get("components", []):
        docs = _load_kustomization(directory / component, docs)
    namespace = kustomization.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = namespace
        for container in _containers(doc):
            for image in kustomization.get("images", []):
                if container["image"] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        for doc in docs:
            if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]:
                for op in yaml.safe_load(patch["patch"]):
                    assert op["op"] in ("add", "replace"), op
                    *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
                    node: Any = doc
                    for part in parents:
                        node = node[part]
                    if isinstance(node, list) and op["op"] == "add":
                        node.insert(len(node) if last == "-" else last, op["value"])
                    elif isinstance(node, list):
                        node[last] = op["value"]
                    else:
                        assert op["op"] == "add" or last in node, f"replace of a missing {op['path']}"
                        node[last] = op["value"]
    return docs


def _kustomize(directory: Path, manual: bool = False) -> list[Manifest]:
    kubectl = None if manual else shutil.which("kubectl")
    if kubectl is not None:
        result = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _load_kustomization(directory)


@cache
def _render(name: str, components: tuple[str, ...] = (), manual: bool = False) -> tuple[Manifest, ...]:
    """The kustomization as shipped or, with components, as deploy/README.md says to opt in to them: a copy
    with `components:` added to its kustomization.yaml."""
    directory = KUBERNETES_DIR / name
    if not components:
        return tuple(_kustomize(directory, manual))
    with tempfile.TemporaryDirectory() as scratch:
        copy_dir = Path(scratch) / (name or "base")
        shutil.copytree(directory, copy_dir)
        kustomization = yaml.safe_load((copy_dir / "kustomization.yaml").read_text())
        assert not kustomization.get("components"), f"{name}: opt-in components are not listed by default"
        kustomization["components"] = list(components)
        (copy_dir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
        return tuple(_kustomize(copy_dir, manual))


def _manifests(name: str = "", components: tuple[str, ...] = ()) -> list[Manifest]:
    return copy.deepcopy(list(_render(name, components)))


def _find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def _containers(doc: Manifest) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    containers: list[dict[str, Any]] = spec.get("containers", [])
    return containers


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def _pod_labels(doc: Manifest) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


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


# --- schema validation ------------------------------------------------------------------------------


def _validate(doc: Manifest) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (ships the schemas, works offline)"
    )
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_manifests_match_the_kubernetes_schemas(name: str) -> None:
    docs = _manifests(name)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        _validate(doc)


def test_schema_validation_rejects_a_misspelled_field() -> None:
    import kubernetes_validate

    deployment = _find(_manifests(), "Deployment", "specgate-gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)


def test_kustomize_renders_the_same_objects_as_the_manual_reading() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl missing: the manifests are read without kustomize")
    for name in KUSTOMIZATIONS:
        rendered = {(d["kind"], d["metadata"]["name"]) for d in _render(name)}
        manual = {(d["kind"], d["metadata"]["name"]) for d in _load_kustomization(KUBERNETES_DIR / name)}
        assert rendered == manual, name


# --- gateway -------------------------------------------------------------------------------------------


def test_gateway_probes_ready_and_health() -> None:
    container = _containers(_find(_manifests(), "Deployment", "specgate-gateway"))[0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8000}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_gateway_runs_as_non_root_and_outlasts_its_drain() -> None:
    deployment = _find(_manifests(), "Deployment", "specgate-gateway")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["terminationGracePeriodSeconds"] > 30, "uvicorn drains streams for 30 s after SIGTERM"


def test_gateway_discovers_the_worker_pods_through_the_headless_service() -> None:
    docs = _manifests()
    gateway = _containers(_find(docs, "Deployment", "specgate-gateway"))[0]
    statefulset = _find(docs, "StatefulSet", "specgate-worker")
    service = _find(docs, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "only a headless Service resolves to every pod"
    assert _env(gateway)["SPECGATE_WORKERS"] == f"dns+http://{service['metadata']['name']}:{WORKER_PORT}"
    from gateway.settings import GatewaySettings

    assert GatewaySettings(discovery_interval_s=_env(gateway)["SPECGATE_DISCOVERY_INTERVAL_S"]).discovery_interval_s


def test_pod_disruption_budgets_cover_gateway_and_workers() -> None:
    docs = _manifests()
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for kind, name in (("Deployment", "specgate-gateway"), ("StatefulSet", "specgate-worker")):
        workload = _find(docs, kind, name)
        covering = [b for b in budgets if _selects(b["spec"]["selector"], _pod_labels(workload))]
        assert len(covering) == 1, f"{kind}/{name} needs one PodDisruptionBudget"
        spec = covering[0]["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
        if "minAvailable" in spec:
            assert spec["minAvailable"] < workload["spec"]["replicas"], "a budget that blocks every drain"


# --- workers ---------------------------------------------------------------------------------------------


def test_workers_are_a_statefulset_behind_a_headless_service() -> None:
    docs = _manifests()
    statefulset = _find(docs, "StatefulSet", "specgate-worker")
    service = _find(docs, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(statefulset))
    assert _selects(statefulset["spec"]["selector"], _pod_labels(statefulset))
    container = _containers(statefulset)[0]
    assert {port["containerPort"] for port in container["ports"]} == {WORKER_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe


def test_worker_gpus_match_the_profile_parallelism() -> None:
    container = _containers(_find(_manifests(), "StatefulSet", "specgate-worker"))[0]
    profile = _profile_of(container["args"])
    assert profile.device == "gpu"
    assert profile.speculative is not None
    assert _gpus(container) == profile.tensor_parallel_size * profile.pipeline_parallel_size
    render(profile, host="0.0.0.0", port=WORKER_PORT, models_dir=Path("/models"), python=sys.executable)


def test_worker_shared_memory_and_cache_are_mounted() -> None:
    statefulset = _find(_manifests(), "StatefulSet", "specgate-worker")
    mounts = {m["mountPath"]: m["name"] for m in _containers(statefulset)[0]["volumeMounts"]}
    assert "/dev/shm" in mounts
    claims = {claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]}
    assert mounts[_env(_containers(statefulset)[0])["HF_HOME"]] in claims


# --- autoscaling -----------------------------------------------------------------------------------------


def _adapter_rules() -> dict[str, Any]:
    configmap = _find(_manifests("monitoring"), "ConfigMap", "prometheus-adapter")
    rules: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    return rules


def _adapter_exposes(section: str) -> dict[str, str]:
    """Metric name as Kubernetes sees it -> the Prometheus series behind it."""
    exposed: dict[str, str] = {}
    for rule in _adapter_rules().get(section, []):
        series = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)", rule["seriesQuery"])
        assert series, rule
        exposed[rule["name"]["as"]] = series.group(1)
    return exposed


def test_hpa_scales_the_workers_on_metrics_the_adapter_serves() -> None:
    hpa = _find(_manifests(), "HorizontalPodAutoscaler", "specgate-worker")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "specgate-worker"}
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
    pods = _adapter_exposes("rules")
    external = _adapter_exposes("externalRules")
    kinds = set()
    for metric in spec["metrics"]:
        kinds.add(metric["type"])
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in pods
        elif metric["type"] == "External":
            assert metric["external"]["metric"]["name"] in external
    assert "Pods" in kinds, "queue depth inside vLLM is the primary signal"


def test_adapter_rules_read_series_the_exporters_have() -> None:
    known = known_metrics()
    for section in ("rules", "externalRules"):
        for name, series in _adapter_exposes(section).items():
            assert series in known, f"adapter metric {name} reads unknown series {series}"
            assert re.fullmatch(r"[a-z0-9_]+", name), f"{name}: Kubernetes metric names have no colons"
    for rule in _adapter_rules()["rules"]:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_pod_monitors_select_the_pods_and_their_ports() -> None:
    monitors = [d for d in _manifests("monitoring") if d["kind"] == "PodMonitor"]
    workloads = [d for d in _manifests() + _manifests("multinode") if d["kind"] in ("Deployment", "StatefulSet")]
    scraped_jobs = set()
    for monitor in monitors:
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["specgate"]
        selected = [w for w in workloads if _selects(monitor["spec"]["selector"], _pod_labels(w))]
        assert selected, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for workload in selected:
                port_names = {p.get("name") for c in _containers(workload) for p in c.get("ports", [])}
                assert endpoint["port"] in port_names, (monitor["metadata"]["name"], workload["metadata"]["name"])
            scraped_jobs |= {r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job"}
    assert scraped_jobs == {"specgate-gateway", "vllm"}, "the jobs configs/prometheus/rules expect"
    scraped = {w["metadata"]["name"] for m in monitors for w in workloads if _selects(m["spec"]["selector"],
                                                                                    _pod_labels(w))}
    assert {"specgate-gateway", "specgate-worker", "specgate-ray-head"} <= scraped


# --- the /metrics token ----------------------------------------------------------------------------------

METRICS_SECRET = {"name": "specgate-metrics", "key": "token"}
# The opt-in (deploy/kubernetes/monitoring/metrics-token): the gateway PodMonitor sends the token.
TOKEN_COMPONENT = ("metrics-token",)


@pytest.mark.parametrize("name", ["", "multinode"])
def test_gateway_reads_the_metrics_token_from_an_optional_secret(name: str) -> None:
    """Without the Secret the pod still starts, with /metrics open."""
    gateway = _containers(_find(_manifests(name), "Deployment", "specgate-gateway"))[0]
    assert _env(gateway)["SPECGATE_METRICS_TOKEN"] == {"secretKeyRef": {**METRICS_SECRET, "optional": True}}


def test_pod_monitors_send_no_token_by_default() -> None:
    """Scraping works with no Secret anywhere: the operator rejects a PodMonitor whose authorization Secret is
    missing from the PodMonitor's namespace, whatever `optional` says, and /metrics is open by default."""
    for monitor in (d for d in _manifests("monitoring") if d["kind"] == "PodMonitor"):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert not endpoint.keys() & {"authorization", "bearerTokenSecret", "basicAuth", "oauth2"}, (
                monitor["metadata"]["name"]
            )


def test_metrics_token_component_sends_the_token_from_the_same_secret_key() -> None:
    # PodMonitor is a CRD, which kubernetes-validate has no schema for: the fields prometheus-operator's
    # PodMetricsEndpoint.authorization (SafeAuthorization) has, with credentials a SecretKeySelector.
    monitor = _find(_manifests("monitoring", TOKEN_COMPONENT), "PodMonitor", "specgate-gateway")
    assert monitor["metadata"]["namespace"] == "monitoring"
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert not endpoint.keys() & {"bearerTokenSecret", "basicAuth", "oauth2"}, "exclusive with authorization"
        authorization = endpoint["authorization"]
        assert set(authorization) <= {"type", "credentials"}
        assert authorization.get("type", "Bearer").lower() == "bearer"
        # No `optional`: the operator ignores it there, so it would only promise what does not happen.
        assert authorization["credentials"] == METRICS_SECRET
    # The rest of the endpoint is the default one's.
    default = _find(_manifests("monitoring"), "PodMonitor", "specgate-gateway")
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        del endpoint["authorization"]
    assert monitor == default


def test_metrics_token_component_leaves_the_worker_pod_monitor_without_a_token() -> None:
    """The token is the gateway's: no other scrape target receives it."""
    monitor = _find(_manifests("monitoring", TOKEN_COMPONENT), "PodMonitor", "specgate-worker")
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert "authorization" not in endpoint
    assert monitor == _find(_manifests("monitoring"), "PodMonitor", "specgate-worker")


def test_metrics_token_component_renders_the_same_without_kubectl() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl missing: the manifests are read without kustomize")
    manual = _render("monitoring", TOKEN_COMPONENT, manual=True)
    kustomized = _render("monitoring", TOKEN_COMPONENT)
    assert [m for m in kustomized if m["kind"] == "PodMonitor"] == [m for m in manual if m["kind"] == "PodMonitor"]


# --- multi-node Ray -------------------------------------------------------------------------------------


def _ray_scripts() -> dict[str, str]:
    scripts: dict[str, str] = _find(_manifests("multinode"), "ConfigMap", "specgate-ray-scripts")["data"]
    return scripts


def test_ray_example_serves_the_ray_profile_over_all_gpus() -> None:
    docs = _manifests("multinode")
    head = _find(docs, "StatefulSet", "specgate-ray-head")
    worker = _find(docs, "StatefulSet", "specgate-ray-worker")
    engine_line = next(line for line in _ray_scripts()["head.sh"].splitlines() if "specgate engine" in line)
    profile = _profile_of(shlex.split(engine_line.split("exec specgate ", 1)[1]))
    assert profile.distributed_executor_backend == "ray"
    total = _gpus(_containers(head)[0]) + worker["spec"]["replicas"] * _gpus(_containers(worker)[0])
    assert total == profile.tensor_parallel_size * profile.pipeline_parallel_size
    assert _env(_containers(head)[0])["RAY_CLUSTER_GPUS"] == str(total)
    for statefulset in (head, worker):
        assert _env(_containers(statefulset)[0])["GPUS_PER_NODE"] == str(_gpus(_containers(statefulset)[0]))


def test_ray_nodes_find_the_head_and_land_on_distinct_nodes() -> None:
    docs = _manifests("multinode")
    head = _find(docs, "StatefulSet", "specgate-ray-head")
    worker = _find(docs, "StatefulSet", "specgate-ray-worker")
    service = _find(docs, "Service", head["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True, "the head is not ready until the workers joined"
    assert worker["spec"]["serviceName"] == service["metadata"]["name"]
    assert _env(_containers(worker)[0])["RAY_HEAD"] == f"specgate-ray-head-0.{service['metadata']['name']}"
    for statefulset in (head, worker):
        assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(statefulset))
        anti = statefulset["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        term = anti["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert _selects(term["labelSelector"], _pod_labels(head))
        assert _selects(term["labelSelector"], _pod_labels(worker))


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
    docs = _manifests("multinode")
    gateway = _containers(_find(docs, "Deployment", "specgate-gateway"))[0]
    service = _find(docs, "StatefulSet", "specgate-ray-head")["spec"]["serviceName"]
    assert _env(gateway)["SPECGATE_WORKERS"] == f"http://specgate-ray-head-0.{service}:{WORKER_PORT}"
