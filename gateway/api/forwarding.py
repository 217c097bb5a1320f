"""Forwarding: one request to a worker and back, read top-down in `Forwarding.forward`:
validate → the key's policy and limits → admit → dispatch → stream (or whole call) → account.

Contract: every request is accounted once (metrics and log line), whatever ends it; an admitted request's slot
and in-flight count are given back on every path (`AdmittedRequest`, closed in `forward`'s `finally` unless a
streaming response took it over); before bytes go out a failure is an OpenAI error answer, after them one final
error event (streaming/stream.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
from fastapi import Request
from fastapi.responses import Response

from gateway.admission.admission import AdmittedRequest
from gateway.admission.client_watch import ClientWatch
from gateway.admission.deadlines import WaitGuard
from gateway.api.resuming import StreamResumer
from gateway.errors import (
    ClientDisconnected,
    DeadlinePassed,
    GatewayError,
    ModelNotFound,
    NoWorkerAvailable,
    PermissionDenied,
    RequestTooLarge,
    ShuttingDown,
    UpstreamFailed,
    UpstreamTimeout,
    WorkersBusy,
)
from gateway.middleware.auth import TENANT, may_pin
from gateway.observability.record import DISCONNECTED_STATUS, RequestRecord, server_timing, token_count
from gateway.observability.speculation import take_speculation
from gateway.schemas import Kind, OpenAICall, parse_json_body, validate_call
from gateway.services import Services
from gateway.streaming.answer_text import text_digest, whole_answer_text
from gateway.streaming.failover import ResumableStream
from gateway.streaming.resume import resumable
from gateway.streaming.sent_log import SentLog
from gateway.streaming.stream import Stream
from gateway.streaming.usage import UsageFilter
from gateway.tenants.keys_file import Tenant
from gateway.tenants.limiter import Grant
from gateway.tenants.policy import apply_key_policy, queue_rank
from gateway.upstream.calls import OpenStream
from gateway.workers.pool import Worker

logger = logging.getLogger("specgate.forwarding")

SERVED_MODEL_HEADER = b"x-specgate-model"
WORKER_HEADER = b"x-specgate-worker"
PIN_HEADER = "x-specgate-route-to"
# Before the first byte, nothing of the model could take it: the next model of the route's fallbacks may.
FALL_BACK_ON = (NoWorkerAvailable, UpstreamFailed, WorkersBusy)
UNVALIDATED_MODEL = "unknown"  # rejected requests are counted under one label, not a client-chosen name
UNEXPECTED_STATUS = "500"
T = TypeVar("T")


class Forwarding:
    """The forwarding routes' handler, built once per app."""

    def __init__(self, services: Services) -> None:
        self._services = services

    async def forward(self, request: Request, kind: Kind, path: str) -> Response:
        services = self._services
        record = RequestRecord(request_id=request.state.request_id, model=UNVALIDATED_MODEL, endpoint=kind,
                               stream=False, received_at=services.clock())
        tenant: Tenant | None = request.scope["state"].get(TENANT)
        grant: Grant | None = None
        try:
            if services.drainer.draining:
                raise ShuttingDown(retry_after_s=1)
            call = await self._validated(request, kind)
            if tenant is not None:
                record.key = tenant.name
                apply_key_policy(tenant, call)
                if services.limiter is not None:
                    grant = await services.limiter.admit(tenant, call, record)
            record.model, record.stream = call.model, call.stream
            shadow = self._route(request, call, record, tenant)
        except BaseException as exc:
            self._finish_early(record, exc)
            self._account(record, grant)
            raise
        account = functools.partial(self._account, grant=grant)
        headers = grant.headers if grant is not None else None
        # From here to the end of the response, the client leaving cancels whatever the request waits on.
        watch = ClientWatch(request.receive)
        watch.start()
        admitted: AdmittedRequest | None = None
        handed_over = False
        try:
            with watch.guard():
                admitted = await self._admitted(call, record, queue_rank(tenant), account)
                # A shadowed greedy answer is kept to compare with the shadow's (by hash, in the log).
                capture: SentLog | None = None
                if shadow is not None:
                    services.shadows.mirror(call, record, shadow, path)
                    capture = SentLog() if record.greedy else None
                if call.stream:
                    response = await self._stream(call, record, path, admitted, watch, request, headers, capture)
                    handed_over = True  # the response owns the slot now, and the watch: it closes both
                    return response
                return await self._complete(call, record, path, admitted, headers, capture)
        except BaseException as exc:
            self._finish_early(record, exc)
            raise
        finally:
            # The one place a request's slot is given back when no response took it over: every exception
            # on every path above passes here.
            if not handed_over:
                if admitted is not None:
                    admitted.close(record)
                else:
                    account(record)
                await watch.stop()

    async def _validated(self, request: Request, kind: Kind) -> OpenAICall:
        settings = self._services.settings
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise RequestTooLarge(f"request body is larger than {limit} bytes")
        body = parse_json_body(raw, settings.max_json_depth)
        call = validate_call(kind, body, request.headers.get(settings.session_header))
        if not (self._services.pool.knows_model(call.model) or self._services.routes.table.route(call.model)):
            raise ModelNotFound(f"The model '{call.model}' does not exist", param="model")
        return call

    def _route(self, request: Request, call: OpenAICall, record: RequestRecord, tenant: Tenant | None) -> str | None:
        """A public route's name becomes the version that serves it (an admin may pin one with a header); the
        shadow version when this request is sampled for one."""
        pinned = request.headers.get(PIN_HEADER)
        if pinned is not None and not may_pin(tenant, self._services.limiter is None, request.client):
            raise PermissionDenied(f"only an admin key may send {PIN_HEADER}")
        return self._services.routes.route_call(call, record, pinned)

    async def _admitted(self, call: OpenAICall, record: RequestRecord, rank: int,
                        account: Callable[[RequestRecord], None]) -> AdmittedRequest:
        services = self._services
        try:
            ticket = await services.admission.acquire(rank)
        finally:
            # A wait that ended in a 429 or a client gone is a wait too: under overload, the ones that matter.
            record.queue_left_at = services.clock()
        return AdmittedRequest(ticket, services.metrics.child(services.metrics.in_flight, call.model), account)

    async def _dispatched(self, call: OpenAICall, record: RequestRecord,
                          send: Callable[[Worker, bytes], Awaitable[T]]) -> tuple[Worker, T]:
        """Route and send the worker's body, with retries on other workers before the first byte; when no worker of
        the model takes it, the route's fallbacks in order."""
        def with_body(body: bytes) -> Callable[[Worker], Awaitable[T]]:
            return lambda worker: send(worker, body)

        models = (call.model, *call.fallbacks)
        for index, model in enumerate(models):
            if index:
                logger.info("request %s: %s could not take it, falling back to %s", record.request_id, call.model,
                            model)
                call.retarget(model)
                record.served_model = model
            try:
                return await self._services.dispatcher.attempt(call, record, with_body(call.upstream_body()))
            except FALL_BACK_ON:
                if index == len(models) - 1:
                    raise
        raise AssertionError("unreachable: the last model's failure is raised")

    async def _stream(self, call: OpenAICall, record: RequestRecord, path: str, admitted: AdmittedRequest,
                      watch: ClientWatch, request: Request, headers: dict[str, str] | None,
                      capture: SentLog | None) -> Response:
        services = self._services
        digest = capture is not None
        resumable_call = services.settings.max_migrations > 0 and resumable(call)
        sent = capture if capture is not None else (SentLog() if resumable_call else None)

        def finish(done: RequestRecord) -> None:
            services.drainer.untrack(opened)
            services.pool.finished(resumer.worker if resumer is not None else worker, done)
            if digest and sent is not None:
                done.output_sha256 = text_digest(sent.text())
            admitted.close(done)

        stream = Stream(None, record, UsageFilter(call.wants_usage, call.wants_continuous_usage), services.clock,
                        finish, sent)
        response = stream.respond(watch, request.scope, services.settings.sse_ping_interval_s,
                                  services.settings.sse_send_timeout_s, headers)

        async def open_on(worker: Worker, body: bytes) -> OpenStream:
            # Which version and worker serve it, for the client: set before the head can go out.
            response.set_header(SERVED_MODEL_HEADER, call.model.encode())
            response.set_header(WORKER_HEADER, worker.url.encode())
            return await services.upstream.open_stream(worker.url, path, body, record.request_id,
                                                       opening=stream.first_read_sink, waiting=worker.load.waiting)

        worker, opened = await self._dispatched(call, record, open_on)
        resumer = None
        if resumable_call and sent is not None:
            resumer = StreamResumer(services, call, record, path, sent, worker)
            opened = ResumableStream(opened, resumer)
        try:
            services.drainer.track(opened)
            stream.attach(opened)
        except BaseException:
            # Nothing will run the response: what the stream holds is given back here (the slot, by `forward`).
            services.drainer.untrack(opened)
            services.pool.finished(worker)
            await opened.aclose()
            raise
        return response

    async def _complete(self, call: OpenAICall, record: RequestRecord, path: str,
                        admitted: AdmittedRequest, headers: dict[str, str] | None,
                        capture: SentLog | None) -> Response:
        services = self._services
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
                    worker, content = await self._dispatched(call, record, functools.partial(
                        self._whole_call, path=path, request_id=record.request_id))
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
        services.pool.finished(worker, record)
        try:
            answer = orjson.loads(content)
            usage = answer.get("usage") or {}
            record.prompt_tokens = token_count(usage.get("prompt_tokens"))
            record.output_tokens = token_count(usage.get("completion_tokens"))
            take_speculation(answer.get("metrics"), record)
            if capture is not None:
                record.output_sha256 = text_digest(whole_answer_text(answer))
        except (orjson.JSONDecodeError, AttributeError):
            pass
        record.finished_at = services.clock()
        admitted.close(record)
        served = {SERVED_MODEL_HEADER.decode(): call.model, WORKER_HEADER.decode(): worker.url,
                  "server-timing": server_timing(record)}
        return Response(content, status_code=200, media_type="application/json",
                        headers={**served, **(headers or {})})

    async def _whole_call(self, worker: Worker, body: bytes, *, path: str, request_id: str) -> bytes:
        return await self._services.upstream.complete(worker.url, path, body, request_id)

    def _account(self, record: RequestRecord, grant: Grant | None = None) -> None:
        # A fault in accounting must not turn an answer into a 5xx nor keep what the request held.
        services = self._services
        try:
            if grant is not None and services.limiter is not None:
                services.limiter.finish(grant, record)
            services.metrics.record(record)
            services.serving.observe(record)
            if services.settings.request_log:
                services.metrics.log(record)
        except Exception:
            logger.exception("request %s: recording it failed", record.request_id)

    def _finish_early(self, record: RequestRecord, exc: BaseException) -> None:
        if record.finished_at is None:
            record.finished_at = self._services.clock()
        if isinstance(exc, (ClientDisconnected, asyncio.CancelledError)):
            record.disconnected = True
            record.status = DISCONNECTED_STATUS
        elif isinstance(exc, GatewayError):
            record.status = exc.metric_status
        else:
            record.status = UNEXPECTED_STATUS
