"""The model routes table: what a public model name (a route) resolves to, as immutable values.

Contract: a `RouteTable` is never changed in place; `with_route` returns a validated copy or raises RoutesError
(gateway/model_routes/checks.py), so a table that is in force stays valid for as long as it is read. A table built
by `parse_routes` / `load_routes_file` (gateway/model_routes/config.py) or `with_route` has passed every check;
one built directly is trusted as given. `Route.to_json` is the route's body in the routes file's shape (the
route's name is the key it sits under), which is also what GET/PUT /admin/routes carry. Names in `fallbacks` that
are route names mean the route, even when a worker also serves a model of that name.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gateway.model_routes.checks import RoutesError, cycle_problems, route_problems


@dataclass(frozen=True, slots=True)
class Target:
    """A served model name (as workers list it) and its share of the route's traffic."""

    model: str
    weight: float


@dataclass(frozen=True, slots=True)
class Shadow:
    """A served model that also gets a copy of a `sample` fraction of the route's requests; its answers are
    discarded."""

    model: str
    sample: float


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    targets: tuple[Target, ...]
    shadow: Shadow | None
    fallbacks: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "targets": [{"model": target.model, "weight": target.weight} for target in self.targets],
            "shadow": None if self.shadow is None else {"model": self.shadow.model, "sample": self.shadow.sample},
            "fallbacks": list(self.fallbacks),
        }

    def main_target(self) -> Target | None:
        """The highest-weight target, the first listed among equals: where a fallback to this route goes."""
        return max(self.targets, key=lambda target: target.weight, default=None)


def _empty_routes() -> Mapping[str, Route]:
    return MappingProxyType({})


@dataclass(frozen=True)
class RouteTable:
    routes: Mapping[str, Route] = field(default_factory=_empty_routes)

    def __post_init__(self) -> None:
        # A private read-only copy: the caller's dict changing later must not change a table in force.
        object.__setattr__(self, "routes", MappingProxyType(dict(self.routes)))

    def route(self, name: str) -> Route | None:
        return self.routes.get(name)

    def to_json(self) -> dict[str, Any]:
        return {"routes": {name: route.to_json() for name, route in self.routes.items()}}

    def targets_of_routes(self) -> frozenset[str]:
        """Every served model some route names: targets, shadows, and fallbacks that are not routes."""
        models: set[str] = set()
        for route in self.routes.values():
            models.update(target.model for target in route.targets)
            if route.shadow is not None:
                models.add(route.shadow.model)
            models.update(name for name in route.fallbacks if name not in self.routes)
        return frozenset(models)

    def with_route(self, route: Route, known_models: Collection[str]) -> RouteTable:
        """This table with `route` added or replaced, checked; raises RoutesError naming every problem.

        The new route gets every check; the others are checked only for fallback cycles through it. A model that
        stopped being served since another route was written must not block editing an unrelated route."""
        routes = dict(self.routes)
        routes[route.name] = route
        problems = route_problems(route, routes.keys(), known_models) + cycle_problems(routes)
        if problems:
            raise RoutesError("\n".join(problems))
        return RouteTable(routes)

    def fallback_chain(self, name: str) -> list[str]:
        """The served models to try, in order, after the route's own pick failed: its fallbacks, a fallback that is
        a route standing for that route's main target followed by that route's own fallbacks, each model once.

        The route's own targets are not left out (a canary's fallback may well be its stable target): the caller
        skips the model it already tried. An unknown name has no chain."""
        route = self.routes.get(name)
        if route is None:
            return []
        chain: list[str] = []
        # Routes already expanded: a valid table has no cycles, but a table built directly is trusted, not checked.
        expanded = {name}

        def add(model: str) -> None:
            if model not in chain:
                chain.append(model)

        def expand(current: Route) -> None:
            for fallback in current.fallbacks:
                via = self.routes.get(fallback)
                if via is None:
                    add(fallback)
                elif fallback not in expanded:
                    expanded.add(fallback)
                    main = via.main_target()
                    if main is not None:
                        add(main.model)
                    expand(via)

        expand(route)
        return chain
