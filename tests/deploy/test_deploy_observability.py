"""Prometheus config and rules (promtool), the Grafana dashboard and its provisioning, and the metric
names and labels every query reads."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.deploy.promql_support import (
    TARGET_LABELS,
    VLLM_METRICS,
    Query,
    all_queries,
    dashboard_queries,
    gateway_metrics,
    known_metrics,
    load_dashboard,
    parse_promql,
    raw_metrics_used,
    recorded_series,
    rule_groups,
)
from tests.deploy.support import DASHBOARD, GRAFANA_DIR, PROMETHEUS_CONFIG, ROOT, RULE_FILES, RULE_TESTS

GENERATOR = ROOT / "deploy" / "tools" / "grafana_dashboard.py"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing (Debian package: prometheus)")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)


# --- promtool ---------------------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_the_rule_files_it_loads(tmp_path: Path) -> None:
    # promtool insists that credentials files exist; the compose entrypoint writes the gateway job's at
    # start. A copy of configs/prometheus points them at files here, written as an unset token is: empty.
    copy = Path(shutil.copytree(PROMETHEUS_CONFIG.parent, tmp_path / "prometheus"))
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for job in config["scrape_configs"]:
        authorization = job.get("authorization", {})
        if "credentials_file" in authorization:
            authorization["credentials_file"] = str(tmp_path / f"{job['job_name']}.token")
            Path(authorization["credentials_file"]).write_text("")
    (copy / PROMETHEUS_CONFIG.name).write_text(yaml.safe_dump(config, sort_keys=False))
    result = _promtool("check", "config", str(copy / PROMETHEUS_CONFIG.name))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout + result.stderr


def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_compute_the_expected_values_on_known_series() -> None:
    assert RULE_TESTS
    result = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - record: a:b:c\n        expr: sum by (model (x)\n")
    assert _promtool("check", "rules", str(broken)).returncode != 0


# --- what the rules say ------------------------------------------------------------------------------


def _recording_rule(name: str) -> str:
    for group in rule_groups():
        for rule in group["rules"]:
            if rule.get("record") == name:
                expr: str = rule["expr"]
                return expr
    raise AssertionError(f"no recording rule {name}")


@pytest.mark.parametrize("metric", ["time_to_first_token", "time_between_tokens", "queue"])
@pytest.mark.parametrize("quantile", ["50", "95", "99"])
def test_latency_quantiles_per_model(metric: str, quantile: str) -> None:
    expr = _recording_rule(f"model:specgate_{metric}_seconds:p{quantile}")
    bucket = f"specgate_{metric}_seconds_bucket"
    assert expr.startswith(f"histogram_quantile(0.{quantile}, sum by (model, le) (rate({bucket}[")


def test_acceptance_rate_is_accepted_over_drafted_tokens() -> None:
    expr = " ".join(_recording_rule("model:vllm_spec_decode_acceptance:ratio_rate5m").split())
    assert "rate(vllm:spec_decode_num_accepted_tokens_total[5m])) / sum by (model_name) (rate(" in expr
    assert "vllm:spec_decode_num_draft_tokens_total[5m])" in expr


def test_every_alert_waits_and_has_a_severity_and_summary() -> None:
    alerts = [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]
    assert {"SpecgateNoHealthyWorker", "SpecgateHighErrorRate", "SpecgateSlowFirstToken", "SpecgateSlowTokens",
            "VllmKvCacheNearlyFull", "SpecDecodeLowAcceptance", "SpecgateQueueing"} <= {a["alert"] for a in alerts}
    for alert in alerts:
        assert alert.get("for"), f"{alert['alert']} fires on one bad sample"
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"]


# --- metric names and labels ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        ('sum by (model) (rate(specgate_requests_total{status=~"5..", model=~"$model"}[$__rate_interval]))',
         {"specgate_requests_total"}, {"model"}),
        ("histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m]))) / on(model) group_left b offset 5m",
         {"a_bucket", "b"}, {"le", "model"}),
        ('label_replace(max by (model_name) (vllm:kv_cache_usage_perc), "model", "$1", "model_name", "(.*)")',
         {"vllm:kv_cache_usage_perc"}, {"model_name"}),
        ("1 + sum(rate(x_total[1m])) > bool 0.5 and up == 1", {"x_total", "up"}, set()),
    ],
)
def test_parse_promql_names_metrics_and_labels(expr: str, metrics: set[str], labels: set[str]) -> None:
    parsed = parse_promql(expr)
    assert parsed.metrics == metrics
    assert parsed.grouping_labels == labels


def test_every_metric_in_rules_and_dashboard_is_exported() -> None:
    unknown = raw_metrics_used() - set(known_metrics())
    assert unknown == set(), "no exporter has these series"


def test_recorded_series_used_anywhere_are_defined() -> None:
    recorded = set(recorded_series())
    for query in all_queries():
        for name in parse_promql(query.expr).metrics:
            if name.count(":") >= 2 and not name.startswith("vllm:"):
                assert name in recorded, f"{query.source} reads {name}, which no rule records"


def _allowed_labels(query: Query) -> tuple[set[str], dict[str, frozenset[str]]]:
    known = {**known_metrics(), **recorded_series()}
    parsed = parse_promql(query.expr)
    labels = set(TARGET_LABELS)
    for name in parsed.metrics:
        labels |= known.get(name, frozenset())
    labels |= {s for s in parsed.string_literals if s.isidentifier()}
    return labels, known


def test_every_label_a_query_uses_exists_on_its_series() -> None:
    for query in all_queries():
        allowed, known = _allowed_labels(query)
        parsed = parse_promql(query.expr)
        for name, matchers in parsed.selectors:
            assert name, f"{query.source}: a selector without a metric name"
            series_labels = known[name] | (TARGET_LABELS if name in known_metrics() else frozenset())
            assert matchers <= series_labels, f"{query.source}: {name} has no {matchers - series_labels}"
        assert parsed.grouping_labels <= allowed, f"{query.source}: {parsed.grouping_labels - allowed}"


def test_gateway_metric_inventory_matches_design() -> None:
    """The inventory comes from gateway.observability.metrics itself; these are the names DESIGN.md promises."""
    names = set(gateway_metrics())
    for histogram in ("time_to_first_token_seconds", "time_between_tokens_seconds", "inter_chunk_seconds",
                      "e2e_seconds", "output_tokens_per_second", "upstream_ttft_seconds", "queue_seconds",
                      "tokens_per_chunk"):
        assert f"specgate_{histogram}_bucket" in names
    for counter in ("requests", "prompt_tokens", "output_tokens", "client_disconnects", "upstream_retries"):
        assert f"specgate_{counter}_total" in names
    assert gateway_metrics()["specgate_requests_total"] == {"model", "worker", "status"}


def test_vllm_metric_names_exist_in_the_installed_vllm() -> None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed; tests/integration/test_prometheus.py checks a live worker")
    package = Path(next(iter(spec.submodule_search_locations)))
    source = "\n".join(
        path.read_text(errors="ignore") for sub in ("v1/metrics", "v1/spec_decode") for path in
        (package / sub).rglob("*.py")
    )
    for name in VLLM_METRICS:
        declared = name.removesuffix("_total")
        assert f'"{declared}"' in source, f"{declared} is not declared in vLLM {package}"


# --- Grafana ----------------------------------------------------------------------------------------------


def _generator(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module runs.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_committed_dashboard_is_what_the_generator_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DASHBOARD.read_text() == _generator(monkeypatch).render_json(), (
        "regenerate: python deploy/tools/grafana_dashboard.py > configs/grafana/dashboards/specgate.json"
    )


def test_dashboard_layout_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        columns = range(grid["x"], grid["x"] + grid["w"])
        cells = {(x, y) for x in columns for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_dashboard_filters_per_model_and_per_worker() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "worker", "instance"} <= set(variables)
    exprs = [q.expr for q in dashboard_queries() if q.source.startswith("panel")]
    assert any('worker=~"$worker"' in e for e in exprs)
    assert any('instance=~"$instance"' in e for e in exprs)
    for query in dashboard_queries():
        if query.source.startswith("panel") and "model" in known_labels_of(query):
            assert "$model" in query.expr, f"{query.source} ignores the model filter"


def known_labels_of(query: Query) -> set[str]:
    known = {**known_metrics(), **recorded_series()}
    labels: set[str] = set()
    for name in parse_promql(query.expr).metrics:
        labels |= known.get(name, frozenset())
    return labels


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    exprs = " ".join(q.expr for q in dashboard_queries())
    for needed in (
        "model:specgate_time_to_first_token_seconds:p50", "model:specgate_time_to_first_token_seconds:p99",
        "model:specgate_time_between_tokens_seconds:p95", "model:specgate_requests_errors:ratio_rate5m",
        "model:specgate_queue_seconds:p95", "specgate_worker_healthy", "vllm:kv_cache_usage_perc",
        "model:vllm_spec_decode_acceptance:ratio_rate5m",
    ):
        assert needed in exprs, needed


def test_datasource_provisioning_matches_the_dashboard() -> None:
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yaml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    variable = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == source["uid"]
    json.dumps(load_dashboard())
