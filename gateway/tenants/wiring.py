"""The tenants stage as the app factory builds it: the keys in force (the keys file, reloaded, and the static
`api_keys`), the limit store (in-process, or Redis with `redis_url`) and the limiter over it.

Contract: no keys configured, nothing is built and nothing is on the request path. A keys file that cannot be
loaded at start raises `KeysFileError` naming the line (the gateway refuses to start); later reloads keep the old
keys when the file breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry

from gateway.settings import GatewaySettings
from gateway.tenants.keys_file import KeyDirectory, legacy_directory
from gateway.tenants.limiter import TenantLimiter
from gateway.tenants.metrics import TenantMetrics
from gateway.tenants.reload import KeysReloader
from gateway.tenants.store.base import LimitStore
from gateway.tenants.store.memory import MemoryLimitStore
from gateway.tenants.store.redis_store import RedisLimitStore


class KeysInForce:
    """What the auth middleware reads on every request; reload results reach the metrics once the app runs."""

    def __init__(self, settings: GatewaySettings) -> None:
        legacy = legacy_directory([key.get_secret_value() for key in settings.api_keys])
        self.metrics: TenantMetrics | None = None
        self.reloader: KeysReloader | None = None
        self._static = legacy
        if settings.keys_file is not None:
            self.reloader = KeysReloader(settings.keys_file, legacy, self._reloaded)

    @property
    def configured(self) -> bool:
        return self.reloader is not None or bool(self._static.tenants)

    def directory(self) -> KeyDirectory:
        return self.reloader.directory if self.reloader is not None else self._static

    def _reloaded(self, ok: bool, message: str) -> None:
        if self.metrics is not None:
            self.metrics.reloaded(ok, message)


def limit_store(settings: GatewaySettings) -> LimitStore:
    if settings.redis_url is not None:
        return RedisLimitStore(settings.redis_url.get_secret_value())
    return MemoryLimitStore()


@contextlib.asynccontextmanager
async def running_tenants(settings: GatewaySettings, keys: KeysInForce, registry: CollectorRegistry,
                          clock: Callable[[], float]) -> AsyncIterator[TenantLimiter | None]:
    """The limiter, with the keys file's watcher and the output charger running, for the app's lifespan."""
    if not keys.configured:
        yield None
        return
    metrics = TenantMetrics(registry)
    keys.metrics = metrics
    limiter = TenantLimiter(limit_store(settings), metrics, fail_open=settings.limits_fail_open,
                            lease_s=settings.concurrency_lease_s, clock=clock)
    tasks = [asyncio.create_task(limiter.run(), name="specgate-charge-output")]
    if keys.reloader is not None:
        tasks.append(asyncio.create_task(keys.reloader.run(), name="specgate-keys-reload"))
    try:
        yield limiter
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await limiter.aclose()
