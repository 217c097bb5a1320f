"""deploy/kubernetes' monitoring: the autoscaler and the adapter's metrics, PodMonitors, the opt-in /metrics token."""

from __future__ import annotations

import re
import shutil
from typing import Any

import pytest
import yaml

from tests.deploy.k8s_support import (
    containers,
    env_of,
    find_one,
    manifests,
    pod_labels,
    render_kustomization,
    selects,
)
from tests.deploy.promql_support import known_metrics

# --- autoscaling -----------------------------------------------------------------------------------------


def _adapter_rules() -> dict[str, Any]:
    configmap = find_one(manifests("monitoring"), "ConfigMap", "prometheus-adapter")
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
    hpa = find_one(manifests(), "HorizontalPodAutoscaler", "specgate-worker")
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
    monitors = [d for d in manifests("monitoring") if d["kind"] == "PodMonitor"]
    workloads = [d for d in manifests() + manifests("multinode") if d["kind"] in ("Deployment", "StatefulSet")]
    scraped_jobs = set()
    for monitor in monitors:
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["specgate"]
        selected = [w for w in workloads if selects(monitor["spec"]["selector"], pod_labels(w))]
        assert selected, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for workload in selected:
                port_names = {p.get("name") for c in containers(workload) for p in c.get("ports", [])}
                assert endpoint["port"] in port_names, (monitor["metadata"]["name"], workload["metadata"]["name"])
            scraped_jobs |= {r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job"}
    assert scraped_jobs == {"specgate-gateway", "vllm"}, "the jobs configs/prometheus/rules expect"
    scraped = {w["metadata"]["name"] for m in monitors for w in workloads if selects(m["spec"]["selector"],
                                                                                    pod_labels(w))}
    assert {"specgate-gateway", "specgate-worker", "specgate-ray-head"} <= scraped


# --- the /metrics token ----------------------------------------------------------------------------------

METRICS_SECRET = {"name": "specgate-metrics", "key": "token"}
# The opt-in (deploy/kubernetes/monitoring/metrics-token): the gateway PodMonitor sends the token.
TOKEN_COMPONENT = ("metrics-token",)


@pytest.mark.parametrize("name", ["", "multinode"])
def test_gateway_reads_the_metrics_token_from_an_optional_secret(name: str) -> None:
    """Without the Secret the pod still starts, with /metrics open."""
    gateway = containers(find_one(manifests(name), "Deployment", "specgate-gateway"))[0]
    assert env_of(gateway)["SPECGATE_METRICS_TOKEN"] == {"secretKeyRef": {**METRICS_SECRET, "optional": True}}


def test_pod_monitors_send_no_token_by_default() -> None:
    """Scraping works with no Secret anywhere: the operator rejects a PodMonitor whose authorization Secret is
    missing from the PodMonitor's namespace, whatever `optional` says, and /metrics is open by default."""
    for monitor in (d for d in manifests("monitoring") if d["kind"] == "PodMonitor"):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert not endpoint.keys() & {"authorization", "bearerTokenSecret", "basicAuth", "oauth2"}, (
                monitor["metadata"]["name"]
            )


def test_metrics_token_component_sends_the_token_from_the_same_secret_key() -> None:
    # PodMonitor is a CRD, which kubernetes-validate has no schema for: the fields prometheus-operator's
    # PodMetricsEndpoint.authorization (SafeAuthorization) has, with credentials a SecretKeySelector.
    monitor = find_one(manifests("monitoring", TOKEN_COMPONENT), "PodMonitor", "specgate-gateway")
    assert monitor["metadata"]["namespace"] == "monitoring"
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert not endpoint.keys() & {"bearerTokenSecret", "basicAuth", "oauth2"}, "exclusive with authorization"
        authorization = endpoint["authorization"]
        assert set(authorization) <= {"type", "credentials"}
        assert authorization.get("type", "Bearer").lower() == "bearer"
        # No `optional`: the operator ignores it there, so it would only promise what does not happen.
        assert authorization["credentials"] == METRICS_SECRET
    # The rest of the endpoint is the default one's.
    default = find_one(manifests("monitoring"), "PodMonitor", "specgate-gateway")
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        del endpoint["authorization"]
    assert monitor == default


def test_metrics_token_component_leaves_the_worker_pod_monitor_without_a_token() -> None:
    """The token is the gateway's: no other scrape target receives it."""
    monitor = find_one(manifests("monitoring", TOKEN_COMPONENT), "PodMonitor", "specgate-worker")
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert "authorization" not in endpoint
    assert monitor == find_one(manifests("monitoring"), "PodMonitor", "specgate-worker")


def test_metrics_token_component_renders_the_same_without_kubectl() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl missing: the manifests are read without kustomize")
    manual = render_kustomization("monitoring", TOKEN_COMPONENT, manual=True)
    kustomized = render_kustomization("monitoring", TOKEN_COMPONENT)
    assert [m for m in kustomized if m["kind"] == "PodMonitor"] == [m for m in manual if m["kind"] == "PodMonitor"]
