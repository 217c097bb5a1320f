"""The rules a model routes table keeps, checked on the table's own values (whatever they were parsed from).

Contract: `route_problems` lists what is wrong with one route, `cycle_problems` the fallback cycles of a whole
table, each as one line that starts with what it is about ("route 'chat': ...", "fallback cycle: a -> b -> a").
Nothing here raises; the callers (config.py, RouteTable.with_route) raise `RoutesError` with every line. With
`known_models` empty (no worker has answered yet) names are not checked against what workers serve; every other
rule still holds.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.model_routes.table import Route

NOT_SERVED = "is not a model any worker serves"


class RoutesError(ValueError):
    """A routes table (file, or an edit of one route) that cannot be used; one line per problem."""


def number_text(value: float) -> str:
    """A weight or sample as an operator wrote it: 90 rather than 90.0, and nan or -inf as themselves."""
    number = float(value)  # an int is a valid float argument, and has no is_integer() before Python 3.12
    return str(int(number)) if math.isfinite(number) and number.is_integer() else repr(number)


def route_problems(route: Route, route_names: Collection[str], known_models: Collection[str]) -> list[str]:
    """What is wrong with `route` in a table whose routes are `route_names` (its own name included)."""
    prefix = f"route '{route.name}': "
    problems: list[str] = []
    if not route.name:
        problems.append("a route name is empty")
    problems.extend(prefix + problem for problem in _target_problems(route, known_models))
    shadow = route.shadow
    if shadow is not None:
        if not shadow.model:
            problems.append(prefix + "the shadow's model name is empty")
        elif known_models and shadow.model not in known_models:
            problems.append(prefix + f"shadow '{shadow.model}' {NOT_SERVED}")
        if not (math.isfinite(shadow.sample) and 0 <= shadow.sample <= 1):
            problems.append(prefix + f"shadow sample {number_text(shadow.sample)} is not in [0, 1]")
    seen: set[str] = set()
    for fallback in route.fallbacks:
        if not fallback:
            problems.append(prefix + "a fallback name is empty")
        elif fallback in seen:
            problems.append(prefix + f"fallback '{fallback}' is listed twice")
        elif known_models and fallback not in route_names and fallback not in known_models:
            problems.append(prefix + f"fallback '{fallback}' is neither a route nor a model any worker serves")
        seen.add(fallback)
    return problems


def _target_problems(route: Route, known_models: Collection[str]) -> list[str]:
    if not route.targets:
        return ["has no targets"]
    problems: list[str] = []
    seen: set[str] = set()
    for target in route.targets:
        if not target.model:
            problems.append("a target's model name is empty")
        elif target.model in seen:
            # Two entries would mean two hash scores for one model: say one entry with the summed weight instead.
            problems.append(f"target '{target.model}' is listed twice")
        elif known_models and target.model not in known_models:
            problems.append(f"target '{target.model}' {NOT_SERVED}")
        seen.add(target.model)
        if not math.isfinite(target.weight):
            problems.append(f"target weight {number_text(target.weight)} is not a finite number ({target.model})")
        elif target.weight < 0:
            problems.append(f"target weight {number_text(target.weight)} is negative ({target.model})")
    weights_valid = all(math.isfinite(target.weight) and target.weight >= 0 for target in route.targets)
    if weights_valid and not any(target.weight > 0 for target in route.targets):
        problems.append("weights are all zero")
    return problems


def cycle_problems(routes: Mapping[str, Route]) -> list[str]:
    """Each fallback cycle found, as "fallback cycle: a -> b -> a" (a route naming itself: "a -> a"), starting at
    the cycle's route that comes first in `routes`."""

    def next_routes(name: str) -> list[str]:
        # Names that are routes are followed whatever workers serve: a route name wins over a served model's.
        return list(dict.fromkeys(fallback for fallback in routes[name].fallbacks if fallback in routes))

    on_path, done = 1, 2
    state: dict[str, int] = {}
    problems: list[str] = []
    for start in routes:
        if start in state:
            continue
        # Depth-first, with an explicit stack: a long chain of routes must not meet the recursion limit.
        path = [start]
        pending = [iter(next_routes(start))]
        state[start] = on_path
        while pending:
            following = next(pending[-1], None)
            if following is None:
                state[path.pop()] = done
                pending.pop()
            elif state.get(following) == on_path:
                cycle = [*path[path.index(following):], following]
                problems.append("fallback cycle: " + " -> ".join(cycle))
            elif following not in state:
                state[following] = on_path
                path.append(following)
                pending.append(iter(next_routes(following)))
    return problems
