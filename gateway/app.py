"""The gateway as an ASGI app: `create_app(settings)` wires its parts; the lifespan owns pool, client and tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.admission.admission import Admission
from gateway.admission.shutdown import Drainer
from gateway.api.forwarding import Forwarding
from gateway.api.routes import FORWARDING_ROUTES, router
from gateway.errors import ClientDisconnected, GatewayError, InvalidRequest, MethodNotAllowed, NotFound
from gateway.middleware.auth import ApiKeyMiddleware
from gateway.middleware.fast_routes import Endpoint, FastRoutes, wrapped_in
from gateway.middleware.request_id import HEADER as REQUEST_ID_HEADER
from gateway.middleware.request_id import RequestIdMiddleware
from gateway.model_routes.overrides import RedisOverrides
from gateway.model_routes.shadow import Shadows
from gateway.model_routes.stage import RoutesInForce
from gateway.observability.metrics import Metrics
from gateway.services import Services
from gateway.settings import GatewaySettings
from gateway.streaming.response import TRANSPORT_SEND
from gateway.tenants.wiring import KeysInForce, running_tenants
from gateway.upstream.calls import Upstream
from gateway.upstream.client import WorkerClient
from gateway.upstream.http1.client import Http1WorkerClient
from gateway.workers.dispatch import Dispatcher
from gateway.workers.pool import PoolTiming, WorkerPool
from gateway.workers.serving_stats import ServingStats

logger = logging.getLogger("specgate.gateway")

CLIENT_CLOSED_STATUS = 499


class GatewayApp(FastAPI):
    """FastAPI, with the server's own `send` kept in the scope for response bodies (streaming/response.py), and
    POSTs to the forwarding routes served off Starlette's routing and exception middleware
    (middleware/fast_routes.py)."""

    def __init__(self, fast_routes: Mapping[str, Endpoint], drainer: Drainer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._drainer = drainer
        self._fast_routes = FastRoutes(fast_routes, self.exception_handlers)
        self._fast_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[TRANSPORT_SEND] = send
        if self._drainer.draining and scope["type"] == "http":
            send = _closing_connection(send)
        try:
            if self._fast_routes.serves(scope):
                scope["app"] = self
                if self._fast_stack is None:  # built at the first request, as Starlette builds its own stack
                    self._fast_stack = wrapped_in(self.user_middleware, self._fast_routes)
                await self._fast_stack(scope, receive, send)
            else:
                await super().__call__(scope, receive, send)
        finally:
            # uvicorn's `send` is a method of the object that holds the scope: left in it, a reference cycle that
            # leaves each request's objects to the collector (docs/design/performance.md, "No cyclic garbage
            # per request").
            del scope[TRANSPORT_SEND]


def _closing_connection(send: Send) -> Send:
    """`send` with `connection: close` on the response's head: during a drain, keep-alive clients move on."""

    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
        await send(message)

    return closing


def create_app(
    settings: GatewaySettings,
    worker_client: WorkerClient | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> FastAPI:
    """The gateway as an ASGI app; `worker_client` replaces the network to workers (tests)."""
    drainer = Drainer(settings.shutdown_grace_s, settings.shutdown_notice_s)
    keys = KeysInForce(settings)  # a broken keys file stops the start here, naming its line

    started_pools: list[WorkerPool] = []  # the lifespan's pool, once it runs: what routes may name

    def known_models() -> frozenset[str]:
        return started_pools[-1].known_models() if started_pools else frozenset()

    shared = RedisOverrides(settings.redis_url.get_secret_value()) if settings.redis_url is not None else None
    routes = RoutesInForce(settings.routes_file, known_models, shared)  # so does a broken routes file
    timing = PoolTiming(
        health_interval_s=settings.health_interval_s,
        health_timeout_s=settings.health_timeout_s,
        scrape_interval_s=settings.scrape_interval_s,
        discovery_interval_s=settings.discovery_interval_s,
        eject_after_failures=settings.eject_after_failures,
        warmup_timeout_s=settings.warmup_timeout_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        # The seam to workers: the product's HTTP/1.1 client unless the caller brings one (an in-memory client in
        # tests); the app closes only the client it made.
        workers = worker_client if worker_client is not None else Http1WorkerClient(settings)
        stack = contextlib.AsyncExitStack()
        try:
            pool = WorkerPool(settings.workers, workers, metrics, clock, timing)
            await pool.start()
            started_pools.append(pool)
            drainer.bind(asyncio.get_running_loop())
            admission = Admission(settings.max_concurrency, settings.max_queue, settings.queue_timeout_s,
                                  settings.retry_after_s, clock, settings.priority_ageing_s,
                                  settings.high_priority_reserve)
            limiter = await stack.enter_async_context(running_tenants(settings, keys, metrics.registry, time.time))
            metrics.queued.set_function(lambda: admission.waiting)
            serving = ServingStats()
            upstream = Upstream(workers, settings, clock)
            dispatcher = Dispatcher(pool, settings.routing, settings.routing_per_model, metrics, settings.max_attempts,
                                    settings.retry_backoff_s, settings.retry_after_s, serving)
            shadows = Shadows(dispatcher, upstream, pool, metrics.registry, clock,
                              metrics.log if settings.request_log else lambda record: None,
                              settings.shadow_max_in_flight)
            stack.push_async_callback(shadows.aclose)
            app.state.services = Services(
                settings=settings, clock=clock, metrics=metrics, pool=pool, upstream=upstream, admission=admission,
                dispatcher=dispatcher, serving=serving, drainer=drainer, routes=routes, shadows=shadows,
                limiter=limiter,
            )
            app.state.forwarding = Forwarding(app.state.services)
            health = asyncio.create_task(pool.run(), name="specgate-pool")
            watch_routes = asyncio.create_task(routes.run(), name="specgate-routes")
            logger.info("gateway ready with %d worker(s), models: %s", len(settings.workers), sorted(pool.models()))
            try:
                yield
            finally:
                for task in (health, watch_routes):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        finally:
            await stack.aclose()
            if worker_client is None:
                await workers.aclose()

    app = GatewayApp(
        FORWARDING_ROUTES, drainer, title="specgate", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.drainer = drainer
    app.include_router(router)
    app.add_exception_handler(GatewayError, _gateway_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    # Outermost first: request ids are stamped even on 401s. Without keys there is nothing to check, and a
    # pass-through layer would still be one more frame for every event's wake-up to climb.
    if keys.configured:
        app.add_middleware(ApiKeyMiddleware, directory=keys.directory)
    app.add_middleware(RequestIdMiddleware)
    return app


def error_response(error: GatewayError) -> Response:
    return Response(error.body(), status_code=error.http_status, media_type="application/json", headers=error.headers())


async def _gateway_error(request: Request, exc: GatewayError) -> Response:
    return error_response(exc)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED_STATUS)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404:
        return error_response(NotFound(f"Unknown path {request.url.path}"))
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}"))
    return error_response(InvalidRequest(str(exc.detail)))


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(InvalidRequest(str(exc.errors()[0].get("msg", "invalid request"))))


async def _unexpected(request: Request, exc: Exception) -> Response:
    request_id = request.scope.get("state", {}).get("request_id")
    logger.exception("request %s: unexpected error on %s", request_id, request.url.path)
    response = error_response(GatewayError("internal gateway error"))
    # Off the forwarding routes Starlette answers from outside the user middleware, which stamps the id.
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER.decode()] = request_id
    return response
