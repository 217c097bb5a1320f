"""The gateway's endpoints, thin: the two forwarding routes hand the request to `Forwarding` (forwarding.py); the
others answer from the pool, the admission state and the metrics."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.api.forwarding import Forwarding
from gateway.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RoutesUnavailable,
    UsageUnavailable,
)
from gateway.middleware.auth import TENANT, bearer_token, may_pin, token_matches
from gateway.middleware.fast_routes import Endpoint
from gateway.model_routes.config import RoutesError
from gateway.services import Services, get_services
from gateway.tenants.store.base import StoreUnavailable

logger = logging.getLogger("specgate.admin")
DAY_S = 86_400.0
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

router = APIRouter()
ServicesDep = Annotated[Services, Depends(get_services)]


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _forwarding(request: Request) -> Forwarding:
    forwarding: Forwarding = request.app.state.forwarding
    return forwarding


async def chat_completions(request: Request) -> Response:
    return await _forwarding(request).forward(request, "chat", CHAT_PATH)


async def completions(request: Request) -> Response:
    return await _forwarding(request).forward(request, "completion", COMPLETIONS_PATH)


# POSTs to the forwarding routes skip Starlette's routing and exception middleware (middleware/fast_routes.py);
# in the route table too, as plain Starlette routes (no dependency solving), for the full stack's answers to
# other methods on these paths.
FORWARDING_ROUTES: Mapping[str, Endpoint] = MappingProxyType({
    CHAT_PATH: chat_completions, COMPLETIONS_PATH: completions,
})
router.add_route(CHAT_PATH, chat_completions, methods=["POST"])
router.add_route(COMPLETIONS_PATH, completions, methods=["POST"])


@router.get("/health")
async def health() -> Response:
    return _json({"status": "ok"})


@router.get("/ready")
async def ready(services: ServicesDep) -> Response:
    if services.drainer.draining:
        return _json({"status": "shutting down"}, status=503)
    if services.admission.stalled(services.settings.queue_timeout_s):
        return _json({"status": "admission saturated: every slot taken, none given back for "
                      f"{services.settings.queue_timeout_s:g}s"}, status=503)
    if services.pool.any_ready():
        return _json({"status": "ready"})
    return _json({"status": "no worker ready"}, status=503)


@router.get("/metrics")
async def metrics(request: Request, services: ServicesDep) -> Response:
    # Its labels name workers and their load: operators may keep it for their Prometheus alone.
    token = services.settings.metrics_token
    if token is not None and not token_matches(bearer_token(request.scope), token.get_secret_value().encode()):
        error = AuthenticationFailed("/metrics needs the metrics bearer token", code="invalid_metrics_token")
        return Response(error.body(), status_code=error.http_status, media_type="application/json",
                        headers={"www-authenticate": "Bearer"})
    body, content_type = services.metrics.exposition()
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def list_models(request: Request, services: ServicesDep) -> Response:
    cards = services.pool.models()
    tenant = request.scope["state"].get(TENANT)
    names = [name for name in services.routes.public_names(cards) if tenant is None or tenant.allows_model(name)]
    return _json({"object": "list", "data": [cards.get(name) or _route_card(name) for name in names]})


def _route_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "specgate"}


@router.get("/admin/routes")
async def admin_routes(services: ServicesDep) -> Response:
    """The routes in force, and which of them the admin API changed (they win over the routes file's)."""
    return _json({**services.routes.table.to_json(), "changed_through_admin_api": services.routes.overridden})


@router.delete("/admin/routes/{name}")
async def undo_route_change(name: str, request: Request, services: ServicesDep) -> Response:
    """Undo the admin API's change of a route: the routes file's version of it (or none) is in force again."""
    who = _route_editor(request, services)
    try:
        undone = await services.routes.delete(name, who)
    except StoreUnavailable:
        raise RoutesUnavailable("the routes store cannot record the change right now; nothing changed") from None
    if not undone:
        raise NotFound(f"route '{name}' has no change made through the admin API")
    return _json(services.routes.table.to_json())


def _route_editor(request: Request, services: Services, what: str = "routes") -> str:
    """Who is changing routes (or workers), for the log; refused unless an admin key, or this machine when no
    keys are set."""
    tenant = request.scope["state"].get(TENANT)
    if not may_pin(tenant, services.limiter is None, request.client):
        raise PermissionDenied(f"{what} may be changed by an admin key, or from this machine when no keys are set")
    return tenant.name if tenant is not None else f"{request.client.host if request.client else '?'} (no keys)"


@router.post("/admin/workers/drain")
async def drain_worker(request: Request, services: ServicesDep) -> Response:
    """Take a worker out of routing (`{"worker": URL}`; its open requests go on) or put it back
    (`{"worker": URL, "drain": false}`): for restarting workers one at a time without failing a request."""
    who = _route_editor(request, services, "workers")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    url, drain = (body.get("worker"), body.get("drain", True)) if isinstance(body, dict) else (None, None)
    if not isinstance(url, str) or not isinstance(drain, bool):
        raise InvalidRequest('expected {"worker": "<url>", "drain": true|false}', param="worker")
    worker = services.pool.drain(url.rstrip("/"), drain)
    if worker is None:
        raise NotFound(f"no worker {url} in the pool")
    logger.warning("worker %s %s by %s", worker.url, "drained" if drain else "undrained", who)
    return _json({"worker": worker.url, "draining": worker.draining, "in_flight": worker.in_flight})


@router.put("/admin/routes/{name}")
async def put_route(name: str, request: Request, services: ServicesDep) -> Response:
    """Add or replace a route (canary weights, shadow, fallbacks); new requests follow it at once, open streams
    are untouched. Rollback: put the canary's weight back to 0."""
    who = _route_editor(request, services)
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the route is not valid JSON: {exc}") from None
    try:
        route = await services.routes.put(name, data, who)
    except RoutesError as exc:
        raise InvalidRequest(str(exc)) from None
    except StoreUnavailable:
        raise RoutesUnavailable("the routes store cannot record the change right now; nothing changed") from None
    return _json({name: route.to_json()})


@router.get("/admin/usage")
async def admin_usage(services: ServicesDep, start: float | None = None, end: float | None = None) -> Response:
    """Per key: requests, prompt and output tokens and refusals between `start` and `end` (unix seconds; by
    default the last 24 hours), from the limit store, so every replica's requests are in it with Redis."""
    if services.limiter is None:
        raise NotFound("no keys are configured: there is no per-key usage")
    until = time.time() if end is None else end
    since = until - DAY_S if start is None else start
    if since > until:
        raise InvalidRequest("start is after end", param="start")
    try:
        totals = await services.limiter.usage(since, until)
    except StoreUnavailable:
        raise UsageUnavailable("the limit store cannot be read right now") from None
    return _json({"start": since, "end": until,
                  "keys": {name: dataclasses.asdict(total) for name, total in sorted(totals.items())}})


@router.get("/admin/workers")
async def admin_workers(services: ServicesDep) -> Response:
    return _json({"workers": services.pool.admin_view()})


@router.get("/admin/speculation")
async def admin_speculation(services: ServicesDep) -> Response:
    """Per model: each worker's measured TPOT by load and acceptance, and whether speculating or plain workers
    would serve the traffic seen so far better."""
    return _json({"models": services.serving.advice()})
