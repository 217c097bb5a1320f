"""Shadow traffic: a sampled share of a route's requests is also sent to its shadow version, measured and thrown
away.

Contract: the client's answer only ever comes from the primary; a shadow never delays it (started in a task of
its own after the primary's admission, never holding an admission slot, sent at the worker's lowest priority)
and never counts against a key's limits. At most `max_in_flight` shadows run at once; beyond that they are
dropped and counted. Each shadow is logged as a request line with `shadow_of` = the primary's request id (its
TTFT, TPOT, output length), and, for greedy requests, the SHA-256 of its text, which the primary's line carries
too (`specgate ab-report` pairs them). A shadow's failure is counted and logged at debug level, nothing more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from gateway.errors import GatewayError
from gateway.observability.record import RequestRecord
from gateway.schemas import OpenAICall
from gateway.streaming.answer_text import payload_text, text_digest
from gateway.upstream.calls import OpenStream, Upstream
from gateway.upstream.sse import Event
from gateway.workers.dispatch import Dispatcher
from gateway.workers.pool import Worker, WorkerPool

logger = logging.getLogger("specgate.shadow")

SHADOW_PRIORITY = 100  # vLLM runs lower values first: behind every client request


class Shadows:
    def __init__(self, dispatcher: Dispatcher, upstream: Upstream, pool: WorkerPool, registry: CollectorRegistry,
                 clock: Callable[[], float], log: Callable[[RequestRecord], None], max_in_flight: int) -> None:
        self._dispatcher = dispatcher
        self._upstream = upstream
        self._pool = pool
        self._clock = clock
        self._log = log
        self._max_in_flight = max_in_flight
        self._running: set[asyncio.Task[None]] = set()
        self._outcomes = Counter("specgate_shadow_requests", "Shadow copies of routed requests, by outcome "
                                 "(ok, failed, dropped: too many in flight).", ["route", "model", "outcome"],
                                 registry=registry)

    def mirror(self, call: OpenAICall, primary: RequestRecord, shadow_model: str, path: str) -> None:
        route = primary.route or ""
        if len(self._running) >= self._max_in_flight:
            self._outcomes.labels(route, shadow_model, "dropped").inc()
            return
        body: dict[str, Any] = {**call.body, "model": shadow_model, "stream": True, "priority": SHADOW_PRIORITY,
                                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        shadow = OpenAICall(call.kind, body, body)
        record = RequestRecord(request_id=f"{primary.request_id}-shadow", model=route, endpoint=primary.endpoint,
                               stream=True, received_at=self._clock(), route=route, served_model=shadow_model,
                               shadow_of=primary.request_id, greedy=primary.greedy)
        task = asyncio.get_running_loop().create_task(self._run(shadow, record, path))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, call: OpenAICall, record: RequestRecord, path: str) -> None:
        body = call.upstream_body()

        async def send(worker: Worker) -> OpenStream:
            return await self._upstream.open_stream(worker.url, path, body, record.request_id)

        outcome = "failed"
        try:
            worker, stream = await self._dispatcher.attempt(call, record, send)
            try:
                text = await self._read(stream, record)
            finally:
                self._pool.finished(worker, record)
                await stream.aclose()
            if record.greedy:
                record.output_sha256 = text_digest(text)
            outcome = "ok"
        except GatewayError as exc:
            record.status = exc.metric_status
            logger.debug("shadow %s failed: %s", record.request_id, exc)
        finally:
            record.finished_at = self._clock()
            self._outcomes.labels(record.route or "", record.served_model or "", outcome).inc()
            self._log(record)

    async def _read(self, stream: OpenStream, record: RequestRecord) -> str:
        parts: list[str] = []
        events = stream.first_events
        while True:
            now = self._clock()
            for event in events:
                if event.is_done:
                    return "".join(parts)
                if event.is_error:
                    raise GatewayError("the shadow's worker ended its stream with an error")
                self._take(event, record, now, parts)
            chunk = await stream.next_chunk()
            if not chunk:
                return "".join(parts)
            events = [Event.parse(raw) for raw in stream.splitter.feed(chunk)]

    @staticmethod
    def _take(event: Event, record: RequestRecord, now: float, parts: list[str]) -> None:
        payload = event.payload or {}
        usage = payload.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            new_tokens = usage["completion_tokens"] - record.output_tokens
            record.output_tokens = usage["completion_tokens"]
        else:
            new_tokens = 1 if event.has_content else 0
            record.output_tokens += new_tokens
        if event.has_content:
            parts.append(payload_text(payload))
            record.on_content(now, max(new_tokens, 0))

    async def aclose(self) -> None:
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
