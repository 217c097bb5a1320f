"""The per-process objects every handler needs (`Services`), built once by the app factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from gateway.admission.admission import Admission
from gateway.admission.shutdown import Drainer
from gateway.model_routes.shadow import Shadows
from gateway.model_routes.stage import RoutesInForce
from gateway.observability.metrics import Metrics
from gateway.settings import GatewaySettings
from gateway.tenants.limiter import TenantLimiter
from gateway.upstream.calls import Upstream
from gateway.workers.dispatch import Dispatcher
from gateway.workers.pool import WorkerPool
from gateway.workers.serving_stats import ServingStats


@dataclass(frozen=True)
class Services:
    settings: GatewaySettings
    clock: Callable[[], float]
    metrics: Metrics
    pool: WorkerPool
    upstream: Upstream
    admission: Admission
    dispatcher: Dispatcher
    drainer: Drainer
    serving: ServingStats
    routes: RoutesInForce  # public names to versions (model_routes/)
    shadows: Shadows  # copies of sampled routed requests to a route's shadow version
    limiter: TenantLimiter | None = None  # with keys: their limits (tenants/)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain-def dependency in its thread pool, a thread hop on every request.
    return services_of(request)
