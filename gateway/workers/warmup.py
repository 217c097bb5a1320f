"""A worker that comes up (first seen, back after failing health checks) answers one small request per model it
serves before the pool routes to it: vLLM's first requests after a start pay for compilation and allocation, and
a client's request should not be the one that does.

Contract: `warm_up` returns True when every model answered (any status below 500 counts: a model that refuses a
plain completion is up all the same), False on a 5xx, a connection failure or the deadline. It never raises.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import orjson

from gateway.errors import GatewayError
from gateway.upstream.client import WorkerClient

logger = logging.getLogger("specgate.pool")

WARMUP_PATH = "/v1/completions"


async def warm_up(client: WorkerClient, worker_url: str, models: Iterable[str], timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            for model in models:
                body = orjson.dumps({"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
                reply = await client.post(worker_url, WARMUP_PATH, body, f"specgate-warmup-{model}", False)
                try:
                    await reply.body(64 * 1024)
                finally:
                    await reply.aclose()
                if reply.status >= 500:
                    logger.warning("warm-up of %s on %s answered %d", model, worker_url, reply.status)
                    return False
        return True
    except (GatewayError, TimeoutError) as exc:
        logger.warning("warm-up of %s failed: %s", worker_url, exc or type(exc).__name__)
        return False
