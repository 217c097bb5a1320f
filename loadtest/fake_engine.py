"""Fake vLLM worker: a raw ASGI app that streams vLLM-shaped SSE on a schedule (test double, benchmark target)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.fake_asgi import Receive, Scope, Send, read_body, reset_connection, respond, sleep_until
from loadtest.fake_config import STATUS_FAULTS, FakeEngineConfig, parse_config
from loadtest.fake_metrics import EngineStats, PrefixCache, render_metrics
from loadtest.fake_numbered import numbered_text
from loadtest.fake_request import BadRequest, Plan, apply_headers, plan_request
from loadtest.fake_wire import (
    DONE,
    JSON_HEADERS,
    SSE_HEADERS,
    ChunkWriter,
    error_body,
    full_response,
    models_body,
)

_METRICS_HEADERS = ((b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),)
_NOT_FOUND = b'{"detail":"Not Found"}'


class _Reset(Exception):
    """Raised to unwind a request whose connection the engine has just reset on purpose."""


@dataclass(slots=True)
class _Call:
    """Per-request disconnect state shared between the handler and its watcher."""

    task: asyncio.Task[Any]
    finished: bool = False
    disconnected: bool = False
    resetting: bool = False


class FakeEngine:
    """An OpenAI-compatible fake vLLM worker; one instance per server (its counters live here)."""

    def __init__(self, config: FakeEngineConfig | None = None) -> None:
        self.config = config or FakeEngineConfig()
        self.stats = EngineStats()
        self._prefixes = PrefixCache()
        self._rng = random.Random(self.config.seed)
        self._ids = itertools.count()
        self._id_prefix = os.urandom(4).hex()
        self._slots = asyncio.Semaphore(self.config.max_running) if self.config.max_running else None
        # Token text per chunk size, encoded once: the hot loop only joins a few ready-made byte strings.
        self._texts: dict[int, bytes] = {}

    def _text(self, tokens: int, plan: Plan, before: int) -> bytes:
        if plan.first_token is not None:
            return numbered_text(plan.first_token + before, tokens)
        text = self._texts.get(tokens)
        if text is None:
            text = self._texts[tokens] = self.config.token_text.encode() * tokens
        return text

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._generate(scope, receive, send, chat=path == "/v1/chat/completions")
        elif method == "GET" and path == "/health":
            await respond(send, 200, b"", JSON_HEADERS)
        elif method == "GET" and path == "/v1/models":
            await respond(send, 200, models_body(self.config.model, self.config.max_model_len), JSON_HEADERS)
        elif method == "GET" and path == "/metrics":
            config = self.config
            body = render_metrics(self.stats, model=config.model, kv_capacity_tokens=config.kv_capacity_tokens,
                                  speculative=config.tokens_per_chunk > 1)
            await respond(send, 200, body, _METRICS_HEADERS)
        else:
            await respond(send, 404, _NOT_FOUND, JSON_HEADERS)

    def _draw_fault(self) -> str | None:
        draw = self._rng.random()
        for kind, probability in self.config.faults.probabilities:
            if draw < probability:
                return kind
            draw -= probability
        return None

    async def _generate(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        raw = await read_body(receive)
        if raw is None:
            return
        try:
            plan = plan_request(raw, chat=chat, config=self.config)
            apply_headers(plan, scope["headers"], self.config)
        except BadRequest as exc:
            await respond(send, exc.status, error_body(exc.status, exc.message, exc.param), JSON_HEADERS)
            return
        stats = self.stats
        stats.requests_total += 1
        if plan.fault is None and self.config.faults.probabilities:
            plan.fault, plan.fault_after = self._draw_fault(), self.config.faults.after_events
        if plan.fault in STATUS_FAULTS:
            stats.count_fault(plan.fault)
            status = int(plan.fault)
            headers = [*JSON_HEADERS, (b"retry-after", b"1")] if status in (429, 503) else JSON_HEADERS
            await respond(send, status, error_body(status, f"injected fault: HTTP {status}"), headers)
            return

        task = asyncio.current_task()
        assert task is not None, "ASGI apps run inside a task"
        call = _Call(task=task)
        watcher = asyncio.ensure_future(self._watch(receive, call))
        reserved = plan.prompt_tokens + plan.output_tokens
        try:
            if plan.stream:
                # Like vLLM's StreamingResponse: headers go out at once, even while the request waits for a slot.
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await self._admit(plan)
            stats.running += 1
            stats.tokens_in_flight += reserved
            try:
                if plan.stream:
                    await self._stream(send, plan, call)
                else:
                    await self._complete(send, plan, call)
            finally:
                stats.running -= 1
                stats.tokens_in_flight -= reserved
                if self._slots is not None:
                    self._slots.release()
        except _Reset:
            stats.count_finished("abort")
            if call.resetting:
                await watcher  # returns once the server has seen the connection go
        except asyncio.CancelledError:
            if not call.disconnected:
                raise
            # Our own watcher cancelled us: the client left, so generation stops here (vLLM aborts the request).
            task.uncancel()
            stats.aborted_total += 1
            stats.count_finished("abort")
        finally:
            call.finished = True
            watcher.cancel()

    async def _admit(self, plan: Plan) -> None:
        stats = self.stats
        stats.prompt_tokens_total += plan.prompt_tokens
        stats.prefix_queries_total += plan.prompt_tokens
        # Every prefix is looked up (and so remembered); the longest one seen before is the cached part.
        hits = [tokens for key, tokens in plan.prefixes if self._prefixes.lookup(key)]
        if hits:
            stats.prefix_hits_total += max(hits)
        if self._slots is None:
            return
        if self._slots.locked():
            stats.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                stats.waiting -= 1
        else:
            await self._slots.acquire()

    async def _watch(self, receive: Receive, call: _Call) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                call.disconnected = True
                if not call.finished and not call.resetting:
                    call.task.cancel()
                return

    def _request_id(self, plan: Plan) -> str:
        base = plan.request_id or f"{self._id_prefix}{next(self._ids):08x}"
        return ("chatcmpl-" if plan.chat else "cmpl-") + base

    async def _strike(self, send: Send, plan: Plan, call: _Call) -> None:
        self.stats.count_fault(plan.fault or "")
        if plan.fault == "stall":
            await asyncio.sleep(self.config.faults.stall_s)
            return
        call.resetting = reset_connection(send)
        raise _Reset

    async def _stream(self, send: Send, plan: Plan, call: _Call) -> None:
        stats = self.stats
        writer = ChunkWriter(chat=plan.chat, request_id=self._request_id(plan), model=self.config.model,
                             prompt_tokens=plan.prompt_tokens, continuous_usage=plan.continuous_usage)
        strike_at = plan.fault_after if plan.fault is not None else -1
        sent = produced = 0
        if strike_at == 0:
            await self._strike(send, plan, call)
        deadline = time.perf_counter() + plan.ttft_s
        gap = plan.gap_s
        last_reason = plan.finish_reason
        for index, size in enumerate(plan.event_sizes()):
            if index:
                deadline += gap
                if plan.tokens_per_chunk > 1:
                    stats.spec_drafts_total += 1
                    stats.spec_draft_tokens_total += plan.tokens_per_chunk - 1
                    stats.spec_accepted_tokens_total += size - 1
            deadline = await sleep_until(deadline, gap)
            if index == 0 and plan.chat:
                await send({"type": "http.response.body", "body": writer.role(), "more_body": True})
                sent += 1
                stats.events_total += 1
                if sent == strike_at:
                    await self._strike(send, plan, call)
            produced += size
            last = produced == plan.output_tokens
            chunk = writer.content(self._text(size, plan, produced - size), produced, last_reason if last else None)
            if last:
                call.finished = True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            stats.generation_tokens_total += size
            stats.events_total += 1
            sent += 1
            if sent == strike_at and not last:
                await self._strike(send, plan, call)
        if plan.include_usage:
            await send({"type": "http.response.body", "body": writer.usage_only(produced), "more_body": True})
        stats.count_finished(plan.finish_reason)
        await send({"type": "http.response.body", "body": DONE, "more_body": False})

    async def _complete(self, send: Send, plan: Plan, call: _Call) -> None:
        if plan.fault is not None:
            await self._strike(send, plan, call)
        steps = sum(1 for _ in plan.event_sizes()) - 1
        await asyncio.sleep(plan.ttft_s + steps * plan.gap_s)
        self.stats.generation_tokens_total += plan.output_tokens
        self.stats.count_finished(plan.finish_reason)
        body = full_response(chat=plan.chat, request_id=self._request_id(plan), model=self.config.model,
                             text=self._text(plan.output_tokens, plan, 0).decode(), finish_reason=plan.finish_reason,
                             prompt_tokens=plan.prompt_tokens, completion_tokens=plan.output_tokens)
        call.finished = True
        await respond(send, 200, body, JSON_HEADERS)


@contextlib.contextmanager
def run_in_thread(engine: FakeEngine | FakeEngineConfig | None = None, *, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve a fake engine under a real uvicorn in a background thread; yields its base URL (for tests)."""
    from loadtest.threaded_server import serve_in_thread

    app = engine if isinstance(engine, FakeEngine) else FakeEngine(engine)
    with serve_in_thread(app, host=host) as url:
        yield url


def main(argv: Sequence[str] | None = None) -> int:
    """`specgate fake-engine ...`: serve a fake vLLM worker in the foreground."""
    import uvicorn

    from loadtest.procs import raise_open_file_limit

    config, args = parse_config(sys.argv[1:] if argv is None else argv)
    print(f"fake vLLM worker (not a model) serving '{config.model}' on http://{args.host}:{args.port}/v1 "
          f"ttft={config.ttft_s * 1000:g}ms gap={config.gap_s * 1000:g}ms k={config.tokens_per_chunk}",
          file=sys.stderr, flush=True)
    raise_open_file_limit()
    # Startup objects live forever; frozen, collections stay short and never stall the streams' schedule.
    gc.collect()
    gc.freeze()
    uvicorn.run(FakeEngine(config), host=args.host, port=args.port, loop="uvloop", http="httptools",
                lifespan="on", access_log=False, log_level=args.log_level, timeout_graceful_shutdown=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
