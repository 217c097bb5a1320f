"""The Compose stacks as the structure tests read them: anchors merged, `extends` resolved, variables at their
defaults; the workers among their services; a worker command run up to its exec of vLLM."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from engine.profiles import EngineProfile, WorkerCommand
from tests.deploy.support import COMPOSE_FILES, compose_model, service_dockerfile

COMPOSE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, enough for the structural checks."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, str):
        def substitute(match: re.Match[str]) -> str:
            name, operator, default = match.group(1), match.group(2), match.group(3) or ""
            value = env.get(name)
            if (operator == ":-" and not value) or (operator == "-" and value is None):
                return default
            return value or ""

        return COMPOSE_VARIABLE.sub(substitute, node)
    return node


def stack_compose(stack: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A stack's Compose file with anchors merged, `extends` resolved and variables at their defaults (or `env`)."""
    resolved: dict[str, Any] = interpolate(compose_model(COMPOSE_FILES[stack]), env or {})
    return resolved


def stack_services(stack: str) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = stack_compose(stack)["services"]
    return services


def all_services() -> list[tuple[str, str, dict[str, Any]]]:
    """(stack, service name, service) for every service of both stacks."""
    return [(stack, name, spec) for stack in COMPOSE_FILES for name, spec in stack_services(stack).items()]


def stack_workers(stack: str) -> dict[str, dict[str, Any]]:
    return {
        name: spec
        for name, spec in stack_services(stack).items()
        if service_dockerfile(spec) in ("Dockerfile.gpu", "Dockerfile.cpu") and spec["command"][0] == "engine"
    }


def all_workers() -> dict[str, dict[str, Any]]:
    return {name: spec for stack in COMPOSE_FILES for name, spec in stack_workers(stack).items()}


def compose_text() -> str:
    return "\n".join(path.read_text() for path in COMPOSE_FILES.values())


def run_engine_capturing_exec(command: list[str], monkeypatch: pytest.MonkeyPatch) -> WorkerCommand:
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


def parallel_size(profile: EngineProfile) -> int:
    return profile.tensor_parallel_size * profile.pipeline_parallel_size
