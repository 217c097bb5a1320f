"""Worker HTTP stage: the client for worker requests and the pool's own client, chosen by settings."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from httpx_aiohttp import AiohttpTransport

from gateway.settings import GatewaySettings
from gateway.upstream.client import (
    AiohttpWorkerClient,
    HttpxWorkerClient,
    WorkerClient,
    aiohttp_session,
    client_timeout,
    httpcore_transport,
)
from gateway.upstream.http1.client import WireWorkerClient


@contextlib.asynccontextmanager
async def worker_clients(
    settings: GatewaySettings, transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[tuple[WorkerClient, httpx.AsyncClient]]:
    """The client for requests to workers and an httpx client for the pool's own calls (health, models,
    metrics); `transport` replaces the network for both (tests, benchmark variants)."""
    wire: WireWorkerClient | None = None
    calls: WorkerClient
    if transport is None and settings.upstream_transport in ("httptools", "aiohttp"):
        session = aiohttp_session(settings)
        transport = AiohttpTransport(client=session)  # closes the session with the httpx client
        if settings.upstream_transport == "httptools":
            calls = wire = WireWorkerClient(settings)
        else:
            calls = AiohttpWorkerClient(session, settings)
    else:
        transport = transport or httpcore_transport(settings)
        calls = HttpxWorkerClient(transport, settings)
    try:
        async with httpx.AsyncClient(timeout=client_timeout(settings), transport=transport, trust_env=False) as client:
            yield calls, client
    finally:
        if wire is not None:
            await wire.aclose()
