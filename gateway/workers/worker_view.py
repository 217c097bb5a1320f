"""One worker as `GET /admin/workers` shows it: health, routing state, this gateway's load on it, its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.workers.pool import Worker


def worker_view(w: Worker, now: float, stale_after_s: float) -> dict[str, Any]:
    return {
        "url": w.url,
        "healthy": w.healthy,
        "available": w.available(now),
        "draining": w.draining,
        "models": sorted(w.models),
        "in_flight": w.in_flight,
        "consecutive_failures": w.consecutive_failures,
        "ejected_for_s": max(0.0, round(w.ejected_until - now, 3)),
        "load_fresh": w.load.fresh(now, stale_after_s),
        "load_age_s": None if w.load.scraped_at == float("-inf") else round(now - w.load.scraped_at, 3),
        "running": w.load.running,
        "waiting": w.load.waiting,
        "kv_cache_usage": w.load.kv_cache_usage,
        "prefix_cache_hit_rate": w.load.prefix_hit_rate,
        "spec_acceptance_rate": w.load.acceptance_rate,
        "spec_mean_acceptance_length": w.load.mean_acceptance_length,
    }
