"""Route changes made through the admin API, where every gateway replica sees them: in this process by default,
in Redis with `redis_url` (a hash of route name -> JSON and a version counter each replica polls).

Contract: `put`/`delete` record a change and bump the version; `version` and `all` read them. A store that cannot
answer raises `StoreUnavailable` within its deadline; the caller refuses the change (nothing half-applied) or,
when polling, keeps what it has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.tenants.store.base import StoreUnavailable

_T = TypeVar("_T")


class RouteOverrides(Protocol):
    async def put(self, name: str, route: dict[str, Any]) -> None: ...

    async def delete(self, name: str) -> None: ...

    async def version(self) -> int: ...

    async def all(self) -> dict[str, dict[str, Any]]: ...

    async def aclose(self) -> None: ...


class MemoryOverrides:
    """One gateway: the changes live in its process."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Any]] = {}
        self._version = 0

    async def put(self, name: str, route: dict[str, Any]) -> None:
        self._routes[name] = route
        self._version += 1

    async def delete(self, name: str) -> None:
        self._routes.pop(name, None)
        self._version += 1

    async def version(self) -> int:
        return self._version

    async def all(self) -> dict[str, dict[str, Any]]:
        return dict(self._routes)

    async def aclose(self) -> None:
        return None


class RedisOverrides:
    """Replicas: the changes live in Redis, and each replica polls the version to pick them up."""

    def __init__(self, url: str, *, prefix: str = "specgate:", timeout_s: float = 0.25) -> None:
        self._redis: Redis = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            retry=Retry(NoBackoff(), 0), decode_responses=True)
        self._routes_key = f"{prefix}routes"
        self._version_key = f"{prefix}routes:version"
        self._deadline = 2 * timeout_s

    async def _call(self, op: Awaitable[_T]) -> _T:
        try:
            async with asyncio.timeout(self._deadline):
                return await op
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis routes store: {type(exc).__name__}: {exc}") from exc

    async def put(self, name: str, route: dict[str, Any]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._routes_key, name, orjson.dumps(route).decode())
            pipe.incr(self._version_key)
            await self._call(pipe.execute())

    async def delete(self, name: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._routes_key, name)
            pipe.incr(self._version_key)
            await self._call(pipe.execute())

    async def version(self) -> int:
        value = await self._call(self._redis.get(self._version_key))
        return int(value or 0)

    async def all(self) -> dict[str, dict[str, Any]]:
        raw = await self._call(self._redis.hgetall(self._routes_key))
        return {str(name): orjson.loads(text) for name, text in raw.items()}

    async def aclose(self) -> None:
        await self._redis.aclose()
