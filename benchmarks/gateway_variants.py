"""specgate with a chosen upstream HTTP client, for the upstream-client comparison (not a product entry point).

    python -m benchmarks.gateway_variants --variant httpx-aiohttp --workers http://127.0.0.1:8100 --port 8001

Variants (everything else is the gateway as shipped, served like gateway/serve.py does):
- httpx-default: httpx's default pool (100 connections, 20 kept alive for 5 s);
- httpx-tuned: httpx's own pool as `upstream_transport: httpcore` builds it (2048 connections, 20 kept alive);
- httpx-aiohttp: httpx's API over aiohttp's connection pool (httpx-aiohttp), what the gateway used before it
  called aiohttp itself;
- aiohttp: aiohttp's client called directly (`upstream_transport: aiohttp`), the default before httptools;
- httptools: the gateway's own client on httptools' parser (gateway/workerwire.py), the default.

A variant may add candidate fixes, monkeypatched here to measure them before they go into gateway/:
`httpx-tuned+reuse+quiet` (see FIXES). Logging is set up as `specgate gateway` does (INFO root logger).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence

import httpx
from httpx_aiohttp import AiohttpTransport
from starlette.requests import Request  # at module level: FastAPI resolves the dependency's annotations here

from gateway.settings import GatewaySettings
from gateway.workerhttp import KEEPALIVE_EXPIRY_S, httpcore_transport

VARIANTS = ("httpx-default", "httpx-tuned", "httpx-aiohttp", "aiohttp", "httptools")
OWN_CLIENTS = ("aiohttp", "httptools")  # chosen by `upstream_transport`, no transport handed in
FIXES = {
    "reuse": "read the upstream body to its end (the chunked terminator after [DONE]) before closing it, so the "
             "connection goes back to the pool instead of being dropped",
    "quiet": "httpx's logger at WARNING: no INFO line per upstream request",
    "noreuse": "the opposite of reuse, for an A/B: close the upstream response at [DONE] without reading its end "
               "(gateway.relay._read_to_end made a no-op), so every request opens a new connection",
    "asyncdep": "get_services as an async dependency: FastAPI runs a sync one in its thread pool on every request",
    "gcdefault": "the opposite of the shipped collector setting, for an A/B: CPython's default thresholds after "
                 "startup (700, 10, 10) instead of gateway.serve's YOUNG_ and FULL_COLLECTION_AFTER",
    "gcyoung10k": "the previous shipped collector setting, for an A/B: young collections after 10,000 net new "
                  "container objects instead of gateway.serve's YOUNG_COLLECTION_AFTER (100,000)",
    "cycles": "the opposite of the shipped unlinking, for an A/B: closed responses keep httpx's response <-> "
              "stream reference cycle, so their objects wait for the garbage collector (worker streams no longer "
              "go through httpx.AsyncClient, which made that cycle; the pool's own calls still do; with an "
              "httpx-* variant only, as the default client makes no httpx responses)",
    "leansse": "a plain ASGI streaming response instead of sse_starlette's EventSourceResponse (no anyio task group, "
               "no cancel scope per event; no pings or send timeout, so a measurement aid, not the fix itself)",
}


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    base, *fixes = text.split("+")
    if base not in VARIANTS or any(fix not in FIXES for fix in fixes):
        raise ValueError(f"bad variant {text!r}: one of {', '.join(VARIANTS)}, then +fix from {', '.join(FIXES)}")
    return base, tuple(fixes)


def apply_fixes(fixes: Sequence[str]) -> None:
    """Patch the gateway's modules; must run before gateway.app (and so gateway.api) is imported."""
    if "gcdefault" in fixes:
        from gateway import serve

        setattr(serve, "YOUNG_COLLECTION_AFTER", 700)  # noqa: B010 (read at startup, after this patch)
        setattr(serve, "FULL_COLLECTION_AFTER", 10)  # noqa: B010
    if "gcyoung10k" in fixes:
        from gateway import serve

        setattr(serve, "YOUNG_COLLECTION_AFTER", 10_000)  # noqa: B010 (read at startup, after this patch)
    if "cycles" in fixes:
        from gateway import pool, workerhttp

        async def close_keeping_the_cycle(response: httpx.Response) -> None:
            await response.aclose()

        async def fetch_keeping_the_cycle(client: httpx.AsyncClient, url: str, timeout_s: float) -> httpx.Response:
            return await client.get(url, timeout=timeout_s)

        setattr(workerhttp, "close_response", close_keeping_the_cycle)  # noqa: B010 (looked up at call time)
        setattr(pool, "fetch", fetch_keeping_the_cycle)  # noqa: B010 (pool imports it by name)
    if "asyncdep" in fixes:
        from gateway import services

        async def get_services(request: Request) -> services.Services:
            found: services.Services = request.app.state.services
            return found

        services.get_services = get_services
    if "quiet" in fixes:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if "reuse" in fixes:
        from gateway import upstream

        close = upstream.OpenStream.aclose

        async def drain_then_close(self: upstream.OpenStream) -> None:
            if not self.closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(0.05):
                        while await self.reply.read():
                            pass
            await close(self)

        upstream.OpenStream.aclose = drain_then_close  # type: ignore[method-assign]
    if "noreuse" in fixes:
        from gateway import relay

        async def leave_unread(stream: object) -> None:
            return None

        setattr(relay, "_read_to_end", leave_unread)  # noqa: B010 (relay_events looks it up at call time)
    if "leansse" in fixes:
        from benchmarks.lean_sse import LeanEventStream
        from gateway import api

        setattr(api, "RelayEventStream", LeanEventStream)  # noqa: B010 (gateway.api imports it by name)


def transport_for(variant: str, settings: GatewaySettings) -> httpx.AsyncBaseTransport | None:
    """The transport handed to create_app; None keeps the client `upstream_transport` chooses."""
    if variant == "httpx-tuned":
        return httpcore_transport(settings)
    if variant == "httpx-default":
        return httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=100, max_keepalive_connections=20))
    if variant == "httpx-aiohttp":
        limits = httpx.Limits(max_connections=settings.max_upstream_connections, keepalive_expiry=KEEPALIVE_EXPIRY_S)
        return AiohttpTransport(limits=limits, trust_env=False)
    if variant in OWN_CLIENTS:
        return None
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway_variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True, help=f"{' | '.join(VARIANTS)}, optionally +{'+'.join(FIXES)}")
    parser.add_argument("--workers", required=True, help="comma-separated worker URLs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    try:
        base, fixes = parse_variant(args.variant)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    apply_fixes(fixes)

    import uvicorn

    from gateway.app import create_app
    from gateway.serve import UVICORN_MARGIN_S, DrainingServer
    from gateway.settings import load_settings

    own_client = {"upstream_transport": base} if base in OWN_CLIENTS else {}
    settings = load_settings(workers=args.workers, host=args.host, port=args.port, log_level=args.log_level,
                             **own_client)
    app = create_app(settings, transport=transport_for(base, settings))
    grace = int(settings.shutdown_grace_s) + UVICORN_MARGIN_S
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=grace)
    DrainingServer(config, app.state.drainer).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
