"""The model routes configuration: its schema, and parsing it into a checked RouteTable.

The shape (also what GET/PUT /admin/routes carry, per route):

    routes:
      chat:                                    # the public name clients send as `model`
        targets: [{model: demo-v1, weight: 90}, {model: demo-v2, weight: 10}]
        shadow: {model: demo-v3, sample: 0.2}  # optional
        fallbacks: [demo-small]                # optional, ordered; served models or other routes

Contract: `parse_routes` / `load_routes_file` either return a `RouteTable` that passed every check of
gateway/model_routes/checks.py or raise `RoutesError` with one line per problem ("route 'chat': weights are all
zero"); `load_routes_file` starts each line with the file's path. Unknown fields, wrong types (a weight of "90" or
true), a route name given twice and duplicate YAML keys are all errors: a typo must never silently move traffic.
`route_from_json` checks one route's shape only; `RouteTable.with_route` then checks the rest.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.model_routes.checks import RoutesError, cycle_problems, route_problems
from gateway.model_routes.table import Route, RouteTable, Shadow, Target

__all__ = ["RoutesError", "load_routes_file", "parse_routes", "route_from_json"]

# Strict: YAML `weight: "90"` or `weight: true` is a mistake to report, not a value to coerce. Ranges (>= 0, in
# [0, 1], non-empty) are checked in checks.py, where edits made through the API get the same messages.
_Name = Annotated[str, Field(strict=True)]
_Number = Annotated[float, Field(strict=True)]


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: _Name
    weight: _Number


class _Shadow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: _Name
    sample: _Number


class _Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[_Target]
    shadow: _Shadow | None = None
    fallbacks: list[_Name] = []

    # `fallbacks:` with nothing under it reads as null: it means "none".
    @field_validator("fallbacks", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value


class _RoutesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    routes: dict[_Name, _Route] = {}

    @field_validator("routes", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML lets a later `chat:` in the same mapping replace an earlier one; here it is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise RoutesError(f"line {key.start_mark.line + 1}: '{key.value}' is given twice")
                seen.add(key.value)
        return super().construct_mapping(node, deep)


def _schema_problems(exc: ValidationError, route: str | None) -> list[str]:
    """Pydantic's errors as "route 'chat': targets[0].weight: Input should be a valid number"; `route` names the
    route when the data is one route's body, None when it is a whole file."""
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        loc: Sequence[int | str] = error["loc"]
        name = route
        if route is None and len(loc) >= 2 and loc[0] == "routes":
            if loc[-1] == "[key]":
                problems.append(f"route name {loc[1]!r}: {error['msg']}")
                continue
            name, loc = str(loc[1]), loc[2:]
        where = ""
        for part in loc:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        text = f"{where}: {error['msg']}" if where else error["msg"]
        problems.append(text if name is None else f"route '{name}': {text}")
    return problems


def _route(name: str, parsed: _Route) -> Route:
    shadow = None if parsed.shadow is None else Shadow(parsed.shadow.model, parsed.shadow.sample)
    return Route(name=name, targets=tuple(Target(target.model, target.weight) for target in parsed.targets),
                 shadow=shadow, fallbacks=tuple(parsed.fallbacks))


def route_from_json(name: str, data: Any) -> Route:
    """One route from its body (`Route.to_json`'s shape, e.g. a PUT /admin/routes body); only the shape is
    checked here: pass the result to `RouteTable.with_route`, which checks the rest."""
    if not isinstance(data, Mapping):
        raise RoutesError(f"route '{name}': the route must be a mapping with `targets:`")
    try:
        parsed = _Route.model_validate(data)
    except ValidationError as exc:
        raise RoutesError("\n".join(_schema_problems(exc, name))) from exc
    return _route(name, parsed)


def parse_routes(data: Mapping[str, Any], known_models: Collection[str]) -> RouteTable:
    if not isinstance(data, Mapping):
        raise RoutesError("the routes configuration must be a mapping with `routes:`")
    try:
        parsed = _RoutesFile.model_validate(data)
    except ValidationError as exc:
        raise RoutesError("\n".join(_schema_problems(exc, None))) from exc
    routes = {name: _route(name, body) for name, body in parsed.routes.items()}
    problems = [problem for route in routes.values() for problem in route_problems(route, routes, known_models)]
    problems.extend(cycle_problems(routes))
    if problems:
        raise RoutesError("\n".join(problems))
    return RouteTable(routes)


def load_routes_file(path: Path, known_models: Collection[str]) -> RouteTable:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RoutesError(f"{path}: cannot read the routes file: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
        if data is not None and not isinstance(data, Mapping):
            raise RoutesError("the routes file must be a mapping with `routes:`")
        return parse_routes(data or {}, known_models)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else 1
        raise RoutesError(f"{path}: line {line}: {exc.problem or exc.context or 'invalid YAML'}") from exc
    except yaml.YAMLError as exc:
        raise RoutesError(f"{path}: {exc}") from exc
    except RoutesError as exc:
        # Every line names the file: the log line of a failed reload is read without the file at hand.
        raise RoutesError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) from exc
