"""Where tenants' limits and usage are kept: the `LimitStore` seam (base), one process (memory), shared (Redis)."""

from gateway.tenants.store.base import (
    WINDOW_S,
    Decision,
    LimitSpec,
    LimitStore,
    StoreUnavailable,
    UsageTotals,
)
from gateway.tenants.store.memory import MemoryLimitStore
from gateway.tenants.store.redis_store import RedisLimitStore

__all__ = [
    "WINDOW_S",
    "Decision",
    "LimitSpec",
    "LimitStore",
    "MemoryLimitStore",
    "RedisLimitStore",
    "StoreUnavailable",
    "UsageTotals",
]
