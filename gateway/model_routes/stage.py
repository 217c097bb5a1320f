"""The route table in force and the request path's "resolve route" step: a public name to the served version
that answers (canary weights, sticky per user, an admin's pin), with the fallbacks to try after it.

Contract: the table in force is the routes file's (re-read when it changes and on SIGHUP; a broken edit keeps the
table in force) with the admin API's changes over it (`put`, undone by `delete`), which win over the file's until
deleted. A change takes effect for the next request here, and on every replica sharing the override store
(Redis) within `POLL_S`; a change the store cannot record is refused, so replicas never disagree for long. Every
change is logged with who made it and what changed. A name that is no route resolves to None: the served model of
that name answers, as without routes.
"""

from __future__ import annotations

import asyncio
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
from gateway.model_routes.overrides import MemoryOverrides, RouteOverrides
from gateway.model_routes.table import Route, RouteTable
from gateway.observability.record import RequestRecord
from gateway.schemas import OpenAICall
from gateway.tenants.store.base import StoreUnavailable

logger = logging.getLogger("specgate.routes")

POLL_S = 0.5  # how soon a change made on another replica is in force here


@dataclass(frozen=True, slots=True)
class Resolution:
    route: Route
    model: str  # the version chosen
    fallbacks: tuple[str, ...]  # served models to try next, in order, the chosen one left out
    shadow: str | None  # the shadow version when this request is sampled for it


class RoutesInForce:
    def __init__(self, path: Path | None, known_models: Callable[[], Collection[str]],
                 overrides: RouteOverrides | None = None, rng: random.Random | None = None) -> None:
        self._known_models = known_models
        self._store = overrides if overrides is not None else MemoryOverrides()
        self._rng = rng or random.Random()
        self._watched: WatchedFile[RouteTable] | None = None
        self._base = RouteTable()
        self._overrides: dict[str, Route] = {}
        self._seen_version = -1
        if path is not None:
            self._watched = WatchedFile(path, self._load, self._file_reloaded, what="routes file", logger=logger)
            self._base = self._watched.value
        self._table = self._base

    @property
    def table(self) -> RouteTable:
        return self._table

    @property
    def overridden(self) -> list[str]:
        return sorted(self._overrides)

    def _load(self, path: Path) -> RouteTable:
        return load_routes_file(path, self._known_models())

    def _file_reloaded(self, ok: bool, message: str) -> None:
        if ok and self._watched is not None:
            self._base = self._watched.value
            self._apply(self._overrides, "routes file")

    def _apply(self, overrides: dict[str, Route], who: str) -> None:
        """The table in force: the file's with `overrides` over it; one that no longer fits is left out, loudly."""
        table = self._base
        kept: dict[str, Route] = {}
        for name, route in overrides.items():
            try:
                table = table.with_route(route, self._known_models())
                kept[name] = route
            except RoutesError as exc:
                logger.error("route %s as changed through the admin API no longer fits the routes: %s", name, exc)
        old, self._table, self._overrides = self._table, table, kept
        for name, route in table.routes.items():
            if old.route(name) != route:
                logger.warning("route changed by %s: %s", who, describe_change(old.route(name), route))
        for name in old.routes.keys() - table.routes.keys():
            logger.warning("route changed by %s: route %s removed", who, name)

    async def put(self, name: str, data: Any, who: str) -> Route:
        """Add or replace one route from its JSON; RoutesError (naming the problem) or StoreUnavailable leave the
        routes as they were."""
        route = route_from_json(name, data)
        self._table.with_route(route, self._known_models())  # refused here, before anything is recorded
        await self._store.put(name, route.to_json())
        self._apply({**self._overrides, name: route}, who)
        return route

    async def delete(self, name: str, who: str) -> bool:
        """Undo the admin API's change of a route (the file's, if it has one, is in force again)."""
        if name not in self._overrides:
            return False
        await self._store.delete(name)
        self._apply({other: route for other, route in self._overrides.items() if other != name}, who)
        return True

    async def refresh(self) -> None:
        """Take the other replicas' changes, when the store's version moved."""
        version = await self._store.version()
        if version == self._seen_version:
            return
        overrides: dict[str, Route] = {}
        for name, data in (await self._store.all()).items():
            try:
                overrides[name] = route_from_json(name, data)
            except RoutesError as exc:
                logger.error("route %s in the shared store is malformed: %s", name, exc)
        self._seen_version = version
        if overrides != self._overrides:
            self._apply(overrides, "another replica")

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
        tasks = [asyncio.create_task(self._poll(), name="specgate-routes-poll")]
        if self._watched is not None:
            tasks.append(asyncio.create_task(self._watched.run(), name="specgate-routes-file"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._store.aclose()

    async def _poll(self) -> None:
        failing = False
        while True:
            try:
                await self.refresh()
                failing = False
            except StoreUnavailable as exc:
                if not failing:
                    logger.error("routes store unavailable, keeping the routes in force: %s", exc)
                failing = True
            await asyncio.sleep(POLL_S)


__all__ = ["Resolution", "RoutesError", "RoutesInForce"]
