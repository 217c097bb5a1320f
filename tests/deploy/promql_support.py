"""What the Prometheus rules and the Grafana dashboard read: the metric names and labels that exist (the
gateway's, vLLM's, Prometheus' own), a small PromQL reader, and every query of the rules and the dashboard."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import yaml

from tests.deploy.support import DASHBOARD, RULE_FILES

# Labels Prometheus itself attaches to every scraped series (compose and Kubernetes scrapes).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod"})
# Series Prometheus makes, not any exporter.
SYNTHETIC_METRICS = frozenset({"up"})

_VLLM_LABELS = frozenset({"model_name", "engine"})
# The vLLM series the rules and the dashboard read, as vLLM's /metrics names them (counters end in
# _total). tests/unit/test_deploy_observability.py checks these names against the installed vLLM's
# source; tests/integration/test_prometheus.py against a live worker.
VLLM_METRICS: dict[str, frozenset[str]] = {
    "vllm:num_requests_running": _VLLM_LABELS,
    "vllm:num_requests_waiting": _VLLM_LABELS,
    "vllm:kv_cache_usage_perc": _VLLM_LABELS,
    "vllm:num_preemptions_total": _VLLM_LABELS,
    "vllm:prefix_cache_queries_total": _VLLM_LABELS,
    "vllm:prefix_cache_hits_total": _VLLM_LABELS,
    "vllm:spec_decode_num_drafts_total": _VLLM_LABELS,
    "vllm:spec_decode_num_draft_tokens_total": _VLLM_LABELS,
    "vllm:spec_decode_num_accepted_tokens_total": _VLLM_LABELS,
}


@cache
def gateway_metrics() -> dict[str, frozenset[str]]:
    """Every sample name the gateway exports, with its labels, from the gateway's own Metrics object."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.observability.histograms import BatchHistogram
    from gateway.observability.metrics import Metrics

    metrics = Metrics()
    for family in vars(metrics).values():
        if isinstance(family, (MetricWrapperBase, BatchHistogram)):
            names = family._labelnames if isinstance(family, MetricWrapperBase) else family.labelnames
            if names:
                family.labels(*("x" for _ in names))
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in found.items()}


def known_metrics() -> dict[str, frozenset[str]]:
    return {**gateway_metrics(), **VLLM_METRICS, **{name: frozenset() for name in SYNTHETIC_METRICS}}


# --- PromQL ---------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)")
_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "Inf", "NaN",
})


@dataclass
class ParsedQuery:
    """What one PromQL expression reads: metric names, label names per selector, grouping labels."""

    metrics: set[str] = field(default_factory=set)
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)
    grouping_labels: set[str] = field(default_factory=set)
    string_literals: set[str] = field(default_factory=set)


def parse_promql(expr: str) -> ParsedQuery:
    """A small lexer-level reading of PromQL, enough to name the series and labels a query uses."""
    parsed = ParsedQuery()
    parsed.string_literals = {literal[1:-1] for literal in _STRING.findall(expr)}
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("0", text)
    for name, matchers in _SELECTOR.findall(text):
        parsed.selectors.append((name, set(_MATCHER_LABEL.findall(matchers))))
    text = _SELECTOR.sub(lambda match: f" {match.group(1) or ''} ", text)
    text = _RANGE.sub(" ", text)
    for labels in _GROUPING.findall(text):
        parsed.grouping_labels.update(label.strip() for label in labels.split(",") if label.strip())
    text = _GROUPING.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        name = match.group(1)
        rest = text[match.end():].lstrip()
        if name in _KEYWORDS or rest.startswith("("):
            continue
        parsed.metrics.add(name)
    parsed.metrics.update(name for name, _ in parsed.selectors if name)
    return parsed


# --- rules and dashboard -------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it was found."""

    source: str
    expr: str


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in RULE_FILES:
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


def rules() -> Iterator[dict[str, Any]]:
    for group in rule_groups():
        yield from group["rules"]


def recorded_series() -> dict[str, frozenset[str]]:
    """Each recording rule's name with the labels its result carries (its grouping and added labels)."""
    recorded: dict[str, frozenset[str]] = {}
    for rule in rules():
        if "record" in rule:
            parsed = parse_promql(rule["expr"])
            added = {s for s in parsed.string_literals if re.fullmatch(r"[A-Za-z_]\w*", s)}
            recorded[rule["record"]] = frozenset(parsed.grouping_labels | added)
    return recorded


def rule_queries() -> list[Query]:
    return [Query(rule.get("record") or rule["alert"], rule["expr"]) for rule in rules()]


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


_LABEL_VALUES = re.compile(r"^label_values\((?:(.*),\s*)?(\w+)\)$")


def dashboard_queries() -> list[Query]:
    dashboard = load_dashboard()
    queries: list[Query] = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append(Query(f"panel '{panel['title']}' {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        definition = variable["query"]["query"]
        match = _LABEL_VALUES.match(definition)
        assert match, f"variable {variable['name']}: only label_values(series, label) is understood here"
        series, label = match.groups()
        queries.append(Query(f"variable {variable['name']}", f"count by ({label}) ({series})"))
    return queries


def all_queries() -> list[Query]:
    return rule_queries() + dashboard_queries()


def raw_metrics_used() -> set[str]:
    """Series the rules and the dashboard read straight from exporters (recorded series left out)."""
    recorded = set(recorded_series())
    used: set[str] = set()
    for query in all_queries():
        used |= parse_promql(query.expr).metrics - recorded
    return used
