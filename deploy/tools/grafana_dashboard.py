"""Generates configs/grafana/dashboards/specgate.json, the provisioned specgate dashboard.

Run `python deploy/tools/grafana_dashboard.py > configs/grafana/dashboards/specgate.json` after an
edit; tests/unit/test_deploy_observability.py fails while the committed JSON and this file differ.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
M = 'model=~"$model"'
MW = 'model=~"$model", worker=~"$worker"'
VI = 'model_name=~"$model", instance=~"$instance"'


@dataclass
class Target:
    expr: str
    legend: str


@dataclass
class Panel:
    title: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    description: str = ""
    extra_defaults: dict[str, Any] = field(default_factory=dict)


def q(quantile: float, metric: str, by: str, selector: str) -> str:
    return f"histogram_quantile({quantile}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{RATE}])))"


def ratio(numerator: str, denominator: str, by: str, selector: str) -> str:
    return (
        f"sum by ({by}) (rate({numerator}{{{selector}}}[{RATE}]))"
        f" / sum by ({by}) (rate({denominator}{{{selector}}}[{RATE}]))"
    )


def quantiles(record: str, label: str = "model") -> list[Target]:
    return [Target(f'{record}:{p}{{{M}}}', f"{{{{{label}}}}} {p}") for p in ("p50", "p95", "p99")]


def stat(title: str, expr: str, unit: str, description: str = "") -> Panel:
    return Panel(title, [Target(expr, title)], unit=unit, kind="stat", width=3, height=4, description=description)


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Overview",
        [
            stat("Requests/s", f"sum(model:specgate_requests:rate5m{{{M}}})", "reqps"),
            stat("5xx ratio", f"max(model:specgate_requests_errors:ratio_rate5m{{{M}}})", "percentunit"),
            stat("TTFT p95", f"max(model:specgate_time_to_first_token_seconds:p95{{{M}}})", "s"),
            stat("TBT p95", f"max(model:specgate_time_between_tokens_seconds:p95{{{M}}})", "s"),
            stat("Healthy workers", "specgate:workers_healthy:sum", "short",
                 "Workers answering /health and not ejected, as the gateway sees them"),
            stat("Draft acceptance", f"avg(model:vllm_spec_decode_acceptance:ratio_rate5m{{{M}}})", "percentunit"),
            stat("In flight", f"sum(specgate_in_flight{{{M}}})", "short"),
            stat("Queued", "sum(specgate_queued)", "short", "Requests waiting for admission at the gateway"),
        ],
    ),
    (
        "Latency per model",
        [
            Panel("Time to first token", quantiles("model:specgate_time_to_first_token_seconds"), "s",
                  description="Request received to first content-bearing event sent to the client"),
            Panel("Time between tokens", quantiles("model:specgate_time_between_tokens_seconds"), "s",
                  description="Per output token: gap between content events / tokens in the later event"),
            Panel("Queue time", quantiles("model:specgate_queue_seconds"), "s",
                  description="Time waiting for admission at the gateway"),
            Panel(
                "Gateway vs upstream TTFT (p95)",
                [
                    Target(f"model:specgate_time_to_first_token_seconds:p95{{{M}}}", "{{model}} at the client"),
                    Target(q(0.95, "specgate_upstream_ttft_seconds", "model", M), "{{model}} from the worker"),
                    Target(f"model:specgate_e2e_seconds:p95{{{M}}}", "{{model}} end to end"),
                ],
                "s",
                description="The gap between the first two lines is the gateway's own share of TTFT",
            ),
        ],
    ),
    (
        "Per worker",
        [
            Panel("TTFT p95 per worker",
                  [Target(q(0.95, "specgate_time_to_first_token_seconds", "worker", MW), "{{worker}}")], "s"),
            Panel("TBT p95 per worker",
                  [Target(q(0.95, "specgate_time_between_tokens_seconds", "worker", MW), "{{worker}}")], "s"),
            Panel("Inter-chunk gap p95 per worker",
                  [Target(q(0.95, "specgate_inter_chunk_seconds", "worker", MW), "{{worker}}")], "s",
                  description="Gap between content events as the client sees them (vLLM bench's ITL)"),
            Panel("Tokens per chunk per worker",
                  [Target(ratio("specgate_tokens_per_chunk_sum", "specgate_tokens_per_chunk_count", "worker", MW),
                          "{{worker}}")], "short",
                  description="Above 1 when speculative decoding accepts draft tokens"),
            Panel("Output tokens/s per worker",
                  [Target(f"sum by (worker) (rate(specgate_output_tokens_total{{{MW}}}[{RATE}]))", "{{worker}}")],
                  "short"),
            Panel("Per-request decode speed p50 per worker",
                  [Target(q(0.5, "specgate_output_tokens_per_second", "worker", MW), "{{worker}}")], "short",
                  description="(output tokens - 1) / (last - first token time), per request"),
            Panel("Worker health (gateway view)",
                  [Target('specgate_worker_healthy{worker=~"$worker"}', "{{worker}}")], "short",
                  extra_defaults={"min": 0, "max": 1}),
            Panel("Open requests per worker",
                  [Target('specgate_worker_in_flight{worker=~"$worker"}', "{{worker}}")], "short"),
        ],
    ),
    (
        "Traffic and errors",
        [
            Panel("Requests/s by status",
                  [Target(f"sum by (model, status) (rate(specgate_requests_total{{{M}}}[{RATE}]))",
                          "{{model}} {{status}}")], "reqps"),
            Panel(
                "Error and rejection ratio",
                [
                    Target(f"model:specgate_requests_errors:ratio_rate5m{{{M}}}", "{{model}} 5xx"),
                    Target(f"model:specgate_requests_rejected:ratio_rate5m{{{M}}}", "{{model}} 429"),
                ],
                "percentunit",
            ),
            Panel(
                "Client disconnects and upstream retries",
                [
                    Target(f"sum by (model) (rate(specgate_client_disconnects_total{{{M}}}[{RATE}]))",
                           "{{model}} disconnects"),
                    Target(f"sum by (model) (rate(specgate_upstream_retries_total{{{M}}}[{RATE}]))",
                           "{{model}} retries"),
                ],
                "reqps",
            ),
            Panel(
                "Tokens/s",
                [
                    Target(f"sum by (model) (rate(specgate_prompt_tokens_total{{{M}}}[{RATE}]))", "{{model}} prompt"),
                    Target(f"sum by (model) (rate(specgate_output_tokens_total{{{M}}}[{RATE}]))", "{{model}} output"),
                ],
                "short",
            ),
        ],
    ),
    (
        "vLLM engine",
        [
            Panel("KV cache usage", [Target(f"vllm:kv_cache_usage_perc{{{VI}}}", "{{instance}}")], "percentunit",
                  extra_defaults={"min": 0, "max": 1}),
            Panel(
                "Requests running and waiting",
                [
                    Target(f"sum by (instance) (vllm:num_requests_running{{{VI}}})", "{{instance}} running"),
                    Target(f"sum by (instance) (vllm:num_requests_waiting{{{VI}}})", "{{instance}} waiting"),
                ],
                "short",
            ),
            Panel("Preemptions/s",
                  [Target(f"sum by (instance) (rate(vllm:num_preemptions_total{{{VI}}}[{RATE}]))", "{{instance}}")],
                  "short"),
            Panel("Prefix cache hit ratio",
                  [Target(f"model:vllm_prefix_cache_hits:ratio_rate5m{{{M}}}", "{{model}}")], "percentunit",
                  extra_defaults={"min": 0, "max": 1}),
        ],
    ),
    (
        "Speculative decoding",
        [
            Panel(
                "Draft acceptance ratio",
                [
                    Target(f"model:vllm_spec_decode_acceptance:ratio_rate5m{{{M}}}", "{{model}}"),
                    Target(ratio("vllm:spec_decode_num_accepted_tokens_total",
                                 "vllm:spec_decode_num_draft_tokens_total", "instance", VI), "{{instance}}"),
                ],
                "percentunit",
                extra_defaults={"min": 0, "max": 1},
            ),
            Panel("Mean acceptance length",
                  [Target(f"model:vllm_spec_decode_mean_acceptance_length:rate5m{{{M}}}", "{{model}}")], "short",
                  description="Tokens per target forward pass with a draft: 1 + accepted tokens per draft"),
            Panel(
                "Draft and accepted tokens/s",
                [
                    Target(f"sum by (instance) (rate(vllm:spec_decode_num_draft_tokens_total{{{VI}}}[{RATE}]))",
                           "{{instance}} drafted"),
                    Target(f"sum by (instance) (rate(vllm:spec_decode_num_accepted_tokens_total{{{VI}}}[{RATE}]))",
                           "{{instance}} accepted"),
                ],
                "short",
            ),
            Panel(
                "Draft acceptance per worker (this gateway's requests)",
                [
                    Target(f"sum by (worker) (rate(specgate_spec_accepted_tokens_total{{{MW}}}[{RATE}])) / "
                           f"sum by (worker) (rate(specgate_spec_draft_tokens_total{{{MW}}}[{RATE}]))", "{{worker}}"),
                    Target(f"model:specgate_spec_acceptance:ratio_baseline1d{{{M}}}", "{{model}} baseline (last day)"),
                ],
                "percentunit",
                extra_defaults={"min": 0, "max": 1},
                description="vLLM's per-request report on the gateway's own requests; the baseline the drift alert "
                            "compares against",
            ),
            Panel("Tokens per chunk per model (client view)",
                  [Target(ratio("specgate_tokens_per_chunk_sum", "specgate_tokens_per_chunk_count", "model", M),
                          "{{model}}")], "short"),
        ],
    ),
]


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def render_panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    rendered: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, **panel.extra_defaults}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend}
            for i, t in enumerate(panel.targets)
        ],
    }
    if panel.kind == "stat":
        rendered["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "value",
        }
    else:
        rendered["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return rendered


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({
            "id": panel_id, "type": "row", "title": row_title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": [],
        })
        panel_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(render_panel(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    return {
        "uid": "specgate",
        "title": "specgate",
        "description": "Per-request TTFT, TBT and throughput at the gateway; vLLM engine and speculative decoding",
        "tags": ["specgate", "vllm"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                    "current": {"selected": True, "text": "Prometheus", "value": "prometheus"},
                    "hide": 0, "refresh": 1, "regex": "", "includeAll": False, "multi": False,
                },
                variable("model", "Model", "label_values(specgate_requests_total, model)"),
                variable("worker", "Worker (gateway view)", f"label_values(specgate_requests_total{{{M}}}, worker)"),
                variable("instance", "vLLM instance",
                         'label_values(vllm:num_requests_running{model_name=~"$model"}, instance)'),
            ]
        },
        "panels": panels,
    }


def render_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_json())
