"""The route table in force and the request path's "resolve route" step: a public name to the served version
that answers (canary weights, sticky per user, an admin's pin), with the fallbacks to try after it.

Contract: the table comes from the routes file (re-read when it changes and on SIGHUP; a broken edit keeps the
table in force) and from `put` (the admin API), which takes effect for the next request; a file change replaces
the whole table, admin changes included (logged). Every change is logged with who made it and what changed. A name
that is no route resolves to None: the served model of that name answers, as without routes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config_watch import WatchedFile
from gateway.errors import InvalidRequest
from gateway.model_routes.changes import describe_change
from gateway.model_routes.choose import choose_target, shadow_sampled
from gateway.model_routes.config import RoutesError, load_routes_file, route_from_json
from gateway.model_routes.table import Route, RouteTable
from gateway.observability.record import RequestRecord
from gateway.schemas import OpenAICall

logger = logging.getLogger("specgate.routes")


@dataclass(frozen=True, slots=True)
class Resolution:
    route: Route
    model: str  # the version chosen
    fallbacks: tuple[str, ...]  # served models to try next, in order, the chosen one left out
    shadow: str | None  # the shadow version when this request is sampled for it


class RoutesInForce:
    def __init__(self, path: Path | None, known_models: Callable[[], Collection[str]],
                 rng: random.Random | None = None) -> None:
        self._known_models = known_models
        self._rng = rng or random.Random()
        self._watched: WatchedFile[RouteTable] | None = None
        self._table = RouteTable()
        if path is not None:
            self._watched = WatchedFile(path, self._load, self._file_reloaded, what="routes file", logger=logger)
            self._table = self._watched.value

    @property
    def table(self) -> RouteTable:
        return self._table

    def _load(self, path: Path) -> RouteTable:
        return load_routes_file(path, self._known_models())

    def _file_reloaded(self, ok: bool, message: str) -> None:
        if not ok or self._watched is None:
            return
        old, new = self._table, self._watched.value
        self._table = new
        for name, route in new.routes.items():
            if old.route(name) != route:
                logger.info("routes file: %s", describe_change(old.route(name), route))
        for name in old.routes.keys() - new.routes.keys():
            logger.info("routes file: route %s removed", name)

    def put(self, name: str, data: Any, who: str) -> Route:
        """Add or replace one route from its JSON; RoutesError (naming the problem) leaves the table as it was."""
        route = route_from_json(name, data)
        old = self._table.route(name)
        self._table = self._table.with_route(route, self._known_models())
        logger.warning("route changed by %s: %s", who, describe_change(old, route))
        return route

    def resolve(self, name: str, sticky_key: str | None, pinned: str | None) -> Resolution | None:
        route = self._table.route(name)
        if route is None:
            return None
        if pinned is not None:
            allowed = {target.model for target in route.targets} | set(self._table.fallback_chain(name))
            if pinned not in allowed:
                raise InvalidRequest(f"'{pinned}' is not a version of route '{name}'", param="x-specgate-route-to")
            model = pinned
        else:
            model = choose_target(route, sticky_key, self._rng)
        fallbacks = tuple(m for m in self._table.fallback_chain(name) if m != model)
        shadow = route.shadow.model if route.shadow is not None and shadow_sampled(route, self._rng) else None
        return Resolution(route, model, fallbacks, shadow)

    def route_call(self, call: OpenAICall, record: RequestRecord, pinned: str | None) -> str | None:
        """Send a call naming a route to the version chosen, with that route's fallbacks; the shadow version when
        this request is sampled for one. A call naming a served model is left as it is."""
        resolution = self.resolve(call.model, call.session_key, pinned)
        if resolution is not None:
            record.route = call.model
            record.greedy = call.body.get("temperature") == 0
            call.retarget(resolution.model)
            call.fallbacks = resolution.fallbacks
        record.served_model = call.model
        return resolution.shadow if resolution is not None else None

    def public_names(self, served: Collection[str]) -> list[str]:
        """What GET /v1/models lists: every route, and every served model no route stands for."""
        hidden = self._table.targets_of_routes()
        return sorted(set(self._table.routes) | {model for model in served if model not in hidden})

    async def run(self) -> None:
        if self._watched is not None:
            await self._watched.run()


__all__ = ["Resolution", "RoutesError", "RoutesInForce"]
