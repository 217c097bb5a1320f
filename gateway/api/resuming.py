"""One stream's resume hook for mid-stream failover (streaming/failover.py): the same request continued on another
worker of the same served model from the text its client already has (streaming/resume.py).

Contract: at most `max_migrations` continuations per request; the failed worker is counted as failed (towards
its ejection) and left out of the continuation's candidates; a continuation that cannot be had (no other worker,
nothing left to generate, a shape that cannot be resumed) returns None and the stream ends with its error event,
as without failover. Every try is counted in `specgate_stream_migrations_total` by outcome.
"""

from __future__ import annotations

import logging

from gateway.errors import GatewayError
from gateway.observability.record import RequestRecord
from gateway.schemas import OpenAICall
from gateway.services import Services
from gateway.streaming.failover import Continuation
from gateway.streaming.resume import continuation_body, splice
from gateway.streaming.sent_log import SentLog
from gateway.upstream.calls import OpenStream
from gateway.workers.pool import Worker

logger = logging.getLogger("specgate.failover")


class StreamResumer:
    def __init__(self, services: Services, call: OpenAICall, record: RequestRecord, path: str,
                 sent: SentLog, worker: Worker) -> None:
        self._services = services
        self._call = call
        self._record = record
        self._path = path
        self._sent = sent  # every byte the client has been sent (Stream's capture)
        self.worker = worker  # the worker the stream reads from now

    async def __call__(self, failure: GatewayError) -> Continuation | None:
        services, record = self._services, self._record
        if record.migrations >= services.settings.max_migrations:
            return None
        text = self._sent.text()
        body = None if self._sent.tool_calls else continuation_body(self._call, text, record.output_tokens)
        if body is None:
            self._count("not_resumable")
            return None
        continued = OpenAICall(self._call.kind, body, body)
        payload = continued.upstream_body()

        async def open_on(worker: Worker) -> OpenStream:
            return await services.upstream.open_stream(worker.url, self._path, payload, record.request_id,
                                                       waiting=worker.load.waiting)

        failed = self.worker
        try:
            worker, stream = await services.dispatcher.attempt(continued, record, open_on, exclude=[failed])
        except GatewayError as exc:
            logger.warning("request %s: worker %s failed mid-stream (%s) and no other could continue it: %s",
                           record.request_id, failed.url, failure.message, exc.message)
            self._count("no_worker")
            return None
        services.pool.finished(failed)
        services.pool.failed(failed)
        self.worker = worker
        record.migrations += 1
        logger.warning("request %s: worker %s failed mid-stream (%s) after %d tokens; continued on %s",
                       record.request_id, failed.url, failure.message, record.output_tokens, worker.url)
        self._count("resumed")
        return stream, splice(self._sent.stream_id, record.prompt_tokens, record.output_tokens)

    def _count(self, outcome: str) -> None:
        self._services.metrics.stream_migrations.labels(self._call.model, outcome).inc()
