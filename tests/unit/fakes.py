"""Test doubles for the gateway's unit tests: scripted workers behind the in-memory worker client, and servers in
threads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI

from gateway.app import create_app
from gateway.settings import GatewaySettings
from gateway.upstream.client import Read, WorkerClient, WorkerReply
from gateway.upstream.http1.errors import WorkerBodyCut, WorkerHungUp, WorkerReadTimeout, WorkerUnreachable
from gateway.upstream.mock import MockAnswer, MockWorkerClient, WorkerCall
from tests.support import free_port, serve_in_thread, wait_until

__all__ = ["free_port", "serve_in_thread", "wait_until"]

MODEL = "demo"


def chat_chunk(content: str | None, completion_tokens: int | None, prompt_tokens: int = 5, **extra: Any) -> bytes:
    """One vLLM-shaped chat chunk; usage is cumulative as with continuous_usage_stats."""
    delta: dict[str, Any] = {} if content is None else {"content": content}
    payload: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": extra.pop("finish_reason", None)}],
    }
    if completion_tokens is not None:
        payload["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    payload.update(extra)
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def usage_chunk(completion_tokens: int, prompt_tokens: int = 5) -> bytes:
    payload = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
# A minimal chat call, whole and streamed.
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


def vllm_stream(tokens_per_event: list[int], with_usage: bool = True) -> list[bytes]:
    """A whole stream: role chunk, content events carrying the given token counts, usage chunk, [DONE]."""
    events = [chat_chunk("", 0 if with_usage else None, role="assistant")]
    total = 0
    for index, tokens in enumerate(tokens_per_event):
        total += tokens
        last = index == len(tokens_per_event) - 1
        events.append(
            chat_chunk(f"t{index}", total if with_usage else None, finish_reason="length" if last else None)
        )
    if with_usage:
        events.append(usage_chunk(total))
    events.append(DONE)
    return events


def data_events(body: str) -> list[str]:
    """A streamed answer's data events, its comments (pings) left out."""
    return [event for event in body.split("\n\n") if event.startswith("data:")]


@dataclass
class ScriptedWorker:
    """Answers health and model listing; POSTs go to `on_post`, which the test sets."""

    url: str = "http://worker-a:8100"
    models: list[str] = field(default_factory=lambda: [MODEL])
    healthy: bool = True
    on_post: Callable[[httpx.Request], httpx.Response] | None = None
    seen: list[httpx.Request] = field(default_factory=list)
    health_error: Exception | None = None
    metrics_text: str = "vllm:num_requests_running 0.0\nvllm:num_requests_waiting 0.0\n"

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            if self.health_error is not None:
                raise self.health_error
            return httpx.Response(200 if self.healthy else 503)
        if request.url.path == "/metrics":
            return httpx.Response(200, text=self.metrics_text)
        if request.url.path == "/v1/models":
            return httpx.Response(
                200, json={"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
            )
        self.seen.append(request)
        assert self.on_post is not None, "test did not script this worker's POST answer"
        return self.on_post(request)


def reply_of(read: Read) -> WorkerReply:
    """A worker's 200 whose body is `read`, for tests that build an OpenStream themselves."""
    async def close() -> None:
        return None

    return WorkerReply(200, {"content-type": "text/event-stream"}, read, close)


def mock_client(*workers: ScriptedWorker) -> MockWorkerClient:
    """The gateway's in-memory worker client in front of scripted workers, by host: a host no worker has is
    refused, as a port with nothing listening is."""
    by_host = {httpx.URL(worker.url).host: worker for worker in workers}

    async def route(call: WorkerCall) -> MockAnswer:
        request = httpx.Request(call.method, call.worker_url + call.path, content=call.body,
                                headers={"x-request-id": call.request_id} if call.request_id else None)
        worker = by_host.get(request.url.host)
        if worker is None:
            raise WorkerUnreachable(f"could not connect to worker: {request.url.host}: connection refused")
        try:
            response = worker.handle(request)
        except httpx.ConnectError as exc:
            raise WorkerUnreachable(f"could not connect to worker: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise WorkerReadTimeout(f"worker sent nothing in time: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise WorkerHungUp("worker closed the connection") from exc
        return MockAnswer(response.status_code, dict(response.headers), _body_of(response))

    return MockWorkerClient(route)


async def _body_of(response: httpx.Response) -> AsyncIterator[bytes]:
    """A scripted response's body chunk by chunk; a transport error raised partway cuts it as a reset would."""
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    try:
        async for chunk in stream:  # a bytes body can be sent again: a scripted answer may be reused
            yield chunk
    except httpx.HTTPError as exc:
        raise WorkerBodyCut(f"worker closed or reset the connection mid-body ({type(exc).__name__})") from exc


def settings_for(*urls: str, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "workers": list(urls), "health_interval_s": 3600, "scrape_interval_s": 3600, "retry_backoff_s": 0.0,
        # Scripted workers count the requests they see: a warm-up would be one more (tested on its own).
        "warmup_timeout_s": 0,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@contextlib.asynccontextmanager
async def gateway_client(
    settings: GatewaySettings, worker_client: WorkerClient, **app_kwargs: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The gateway app with its lifespan running, called in-process (bodies are buffered)."""
    app = create_app(settings, worker_client=worker_client, **app_kwargs)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        yield client, app


def requests_finish(client: httpx.Client, timeout_s: float = 2.0) -> bool:
    """Whether the gateway behind `client` records every request as finished (in flight 0) within `timeout_s`."""
    return wait_until(lambda: f'specgate_in_flight{{model="{MODEL}"}} 0.0' in client.get("/metrics").text,
                      timeout_s=timeout_s)


class SlowWorker:
    """An ASGI worker under real uvicorn that streams scripted events with delays and records
    whether the gateway hung up on it (the signal vLLM uses to abort a request)."""

    def __init__(self, events: list[bytes], gap_s: float, first_delay_s: float = 0.0, status: int = 200,
                 end_delay_s: float = 0.0, prefill_s: float = 0.0) -> None:
        self.events = events
        self.gap_s = gap_s
        self.first_delay_s = first_delay_s  # before the head
        self.prefill_s = prefill_s  # between the head and the first event, as vLLM answers
        self.end_delay_s = end_delay_s  # between the last event and the end of the body (chunked terminator)
        self.status = status
        self.started = threading.Event()
        self.disconnected = threading.Event()
        self.completed = threading.Event()
        self.clients: list[tuple[str, int]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/health":
            await _plain(send, 200, b"{}")
            return
        if path == "/metrics":
            await _plain(send, 200, b"vllm:num_requests_running 0.0\n")
            return
        if path == "/v1/models":
            await _plain(send, 200, json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode())
            return
        while (await receive()).get("more_body"):
            pass
        self.clients.append(tuple(scope["client"]))
        self.started.set()
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await self._stream(send, watcher)
        finally:
            watcher.cancel()

    async def _stream(self, send: Any, watcher: asyncio.Future[None]) -> None:
        if await _sleep_or_disconnect(self.first_delay_s, watcher):
            self.disconnected.set()
            return
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        for index, event in enumerate(self.events):
            delay = self.gap_s if index else self.prefill_s
            if (index or delay) and await _sleep_or_disconnect(delay, watcher):
                self.disconnected.set()
                return
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if self.end_delay_s and await _sleep_or_disconnect(self.end_delay_s, watcher):
            self.disconnected.set()
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.completed.set()


async def _plain(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def _until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _sleep_or_disconnect(seconds: float, watcher: asyncio.Future[None]) -> bool:
    """True when the peer went away during the wait."""
    if watcher.done():
        return True
    done, _ = await asyncio.wait({watcher}, timeout=seconds)
    return bool(done)


@contextlib.contextmanager
def gateway_over(*workers: SlowWorker, **overrides: Any) -> Iterator[tuple[str, FastAPI]]:
    """The gateway under real uvicorn in front of `workers`, each under its own; yields its URL and app."""
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serve_in_thread(worker)) for worker in workers]
        app = create_app(settings_for(*urls, **overrides))
        yield stack.enter_context(serve_in_thread(app)), app
