"""API stage: thin routes; each forwarding handler reads top-down: validate → admit → route → relay."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import Gauge
from starlette.types import Scope

from gateway.admission.admission import Ticket
from gateway.admission.client_watch import ClientWatch
from gateway.admission.deadlines import DeadlinePassed, WaitGuard
from gateway.errors import (
    AuthenticationFailed,
    ClientDisconnected,
    GatewayError,
    ModelNotFound,
    RequestTooLarge,
    ShuttingDown,
    UpstreamTimeout,
)
from gateway.middleware.auth import bearer_token, token_matches
from gateway.middleware.fast_routes import Endpoint
from gateway.observability.metrics import RequestRecord, token_count
from gateway.schemas import Kind, OpenAICall, parse_json_body, validate_call
from gateway.services import Services, get_services, services_of
from gateway.streaming.response import RelayEventStream
from gateway.streaming.stream import DISCONNECTED_STATUS, Relay, UsageFilter
from gateway.upstream.calls import OpenStream
from gateway.workers.pool import Worker

logger = logging.getLogger("specgate.api")
router = APIRouter()
ServicesDep = Annotated[Services, Depends(get_services)]

UNVALIDATED_MODEL = "unknown"
UNEXPECTED_STATUS = "500"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


async def chat_completions(request: Request) -> Response:
    return await forward(request, services_of(request), "chat", CHAT_PATH)


async def completions(request: Request) -> Response:
    return await forward(request, services_of(request), "completion", COMPLETIONS_PATH)


# POSTs to the forwarding routes skip Starlette's routing and exception middleware (gateway/middleware/fast_routes.py);
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
async def list_models(services: ServicesDep) -> Response:
    cards = services.pool.models()
    return _json({"object": "list", "data": [cards[name] for name in sorted(cards)]})


@router.get("/admin/workers")
async def admin_workers(services: ServicesDep) -> Response:
    return _json({"workers": services.pool.admin_view()})


async def forward(request: Request, services: Services, kind: Kind, path: str) -> Response:
    # Rejected requests are counted under one label: a client-chosen model name must not become one.
    record = RequestRecord(
        request_id=request.state.request_id, model=UNVALIDATED_MODEL, endpoint=kind,
        stream=False, received_at=services.clock(),
    )
    try:
        if services.drainer.draining:
            raise ShuttingDown(retry_after_s=1)
        call = await _validated_call(request, services, kind)
    except BaseException as exc:
        _finish_early(services, record, exc)
        _account(services, record)
        raise
    record.model, record.stream = call.model, call.stream
    # From here to the end of the response, the client leaving cancels whatever the request waits on.
    watch = ClientWatch(request.receive)
    watch.start()
    held: Held | None = None
    handed_over = False
    try:
        try:
            with watch.guard():
                ticket = await services.admission.acquire()
        except BaseException:
            # A wait that ended in a 429 or a client gone is a wait too: under overload, the ones that matter.
            record.queue_left_at = services.clock()
            raise
        record.queue_left_at = services.clock()
        held = Held(ticket, services.metrics.child(services.metrics.in_flight, call.model),
                    functools.partial(_account, services))
        with watch.guard():
            if call.stream:
                response = await _stream(services, call, record, path, held.close, watch, request.scope)
                handed_over = True  # the response owns the slot now: it closes it, and the watch, when it ends
                return response
            return await _complete(services, call, record, path, held.close)
    except BaseException as exc:
        _finish_early(services, record, exc)
        raise
    finally:
        # The one place a request's slot is given back when no response took it over: every exception on
        # every path above passes here.
        if not handed_over:
            if held is not None:
                held.close(record)
            else:
                _account(services, record)
            await watch.stop()


class Held:
    """What an admitted request holds (its slot, its in-flight count) and its accounting, given back and done
    exactly once, however the request ends."""

    __slots__ = ("_account", "_closed", "_in_flight", "_ticket")

    def __init__(self, ticket: Ticket, in_flight: Gauge, account: Callable[[RequestRecord], None]) -> None:
        self._ticket = ticket
        self._in_flight = in_flight
        self._account = account
        self._closed = False
        in_flight.inc()

    def close(self, record: RequestRecord) -> None:
        if self._closed:
            return
        self._closed = True
        self._ticket.release()
        self._in_flight.dec()
        self._account(record)


async def _validated_call(request: Request, services: Services, kind: Kind) -> OpenAICall:
    limit = services.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body is larger than {limit} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
    body = parse_json_body(raw, services.settings.max_json_depth)
    call = validate_call(kind, body, request.headers.get(services.settings.session_header))
    if not services.pool.knows_model(call.model):
        raise ModelNotFound(f"The model '{call.model}' does not exist", param="model")
    return call


T = TypeVar("T")


async def _routed(services: Services, call: OpenAICall, record: RequestRecord,
                  send: Callable[[Worker, bytes], Awaitable[T]]) -> tuple[Worker, T]:
    """Route and send the worker's body, with retries on other workers."""
    body = call.upstream_body()
    return await services.dispatcher.attempt(call, record, lambda worker: send(worker, body))


async def _stream(
    services: Services, call: OpenAICall, record: RequestRecord, path: str,
    on_finish: Callable[[RequestRecord], None], watch: ClientWatch, request_scope: Scope,
) -> Response:
    def finish(done: RequestRecord) -> None:
        services.drainer.untrack(opened)
        services.pool.finished(worker)
        on_finish(done)

    # Made before the stream is open, so the first events can open the response from the worker's read callback.
    relay = Relay(None, record, UsageFilter(call.wants_usage, call.wants_continuous_usage), services.clock, finish)
    response = RelayEventStream(
        relay.events(),
        watch=watch,
        after=relay.settle,
        is_final=lambda: relay.final,
        direct_to=relay.write_directly,
        opening=relay.opening,
        ping=services.settings.sse_ping_interval_s,
        sep="\n",
        send_timeout=services.settings.sse_send_timeout_s,
    )
    opener = response.inline_opener(request_scope)
    opening = relay.open_inline(opener) if opener is not None else None

    async def open_on(worker: Worker, body: bytes) -> OpenStream:
        return await services.upstream.open_stream(
            worker.url, path, body, record.request_id, opening=opening, waiting=worker.load.waiting
        )

    worker, opened = await _routed(services, call, record, open_on)
    try:
        services.drainer.track(opened)
        relay.attach(opened)
    except BaseException:
        # Nothing will run the response: what the stream holds is given back here (the slot, by `forward`).
        services.drainer.untrack(opened)
        services.pool.finished(worker)
        await opened.aclose()
        raise
    return response


async def _complete(
    services: Services, call: OpenAICall, record: RequestRecord, path: str,
    on_finish: Callable[[RequestRecord], None],
) -> Response:
    # One deadline for the whole call, retries included: a worker that dribbles its answer is cut at it, and
    # a retry after a timeout would start a new generation with the client's time already spent. A drain
    # ends the call at its own deadline (the guard's), with a 503 the client can retry elsewhere.
    limit = services.settings.request_timeout_s
    drain = WaitGuard()
    services.drainer.track(drain)
    try:
        try:
            drain.begin()
            async with asyncio.timeout(limit):
                worker, content = await _routed(
                    services, call, record,
                    lambda worker, body: services.upstream.complete(worker.url, path, body, record.request_id),
                )
        except asyncio.CancelledError:
            drain.raise_if_cut()
            raise
    except DeadlinePassed:
        raise ShuttingDown(retry_after_s=1) from None
    except TimeoutError:
        raise UpstreamTimeout(f"no whole answer from the workers within {limit:g}s") from None
    finally:
        services.drainer.untrack(drain)
        drain.close()
    services.pool.finished(worker)
    try:
        usage = orjson.loads(content).get("usage") or {}
        record.prompt_tokens = token_count(usage.get("prompt_tokens"))
        record.output_tokens = token_count(usage.get("completion_tokens"))
    except (orjson.JSONDecodeError, AttributeError):
        pass
    record.finished_at = services.clock()
    on_finish(record)
    return Response(content, status_code=200, media_type="application/json")


def _account(services: Services, record: RequestRecord) -> None:
    # A fault in accounting must not turn an answer into a 5xx nor keep what the request held.
    try:
        services.metrics.record(record)
        if services.settings.request_log:
            services.metrics.log(record)
    except Exception:
        logger.exception("request %s: recording it failed", record.request_id)


def _finish_early(services: Services, record: RequestRecord, exc: BaseException) -> None:
    if record.finished_at is None:
        record.finished_at = services.clock()
    if isinstance(exc, (ClientDisconnected, asyncio.CancelledError)):
        record.disconnected = True
        record.status = DISCONNECTED_STATUS
    elif isinstance(exc, GatewayError):
        record.status = exc.metric_status
    else:
        record.status = UNEXPECTED_STATUS
