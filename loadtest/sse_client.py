"""Load generator client: send one streaming OpenAI request (loadtest/wire_client.py) and time its SSE events."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.upstream.http1 import errors as wire
from loadtest import records as kinds
from loadtest.records import RequestResult, RequestSpec
from loadtest.wire_client import StreamClient

_SEPARATOR = b"\n\n"


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How requests are shaped; the same for every request of a run."""

    url: str  # full endpoint URL, e.g. http://127.0.0.1:8000/v1/chat/completions
    model: str
    chat: bool = True
    ignore_eos: bool = False
    # continuous_usage_stats gives exact tokens per event; endpoints that reject it can run without.
    continuous_usage: bool = True
    headers: tuple[tuple[str, str], ...] = ()
    extra_body: tuple[tuple[str, Any], ...] = ()
    request_timeout_s: float = 600.0
    read_timeout_s: float = 60.0


def build_client(options: ClientOptions) -> StreamClient:
    """One client per run, its connections kept alive; the run's own scheduler bounds concurrency."""
    return StreamClient(options.url, options.headers)


def build_body(spec: RequestSpec, options: ClientOptions) -> bytes:
    body: dict[str, Any] = {"model": options.model, "stream": True}
    stream_options: dict[str, bool] = {"include_usage": True}
    if options.continuous_usage:
        stream_options["continuous_usage_stats"] = True
    body["stream_options"] = stream_options
    if options.chat:
        body["messages"] = list(spec.messages) if spec.messages is not None else [
            {"role": "user", "content": spec.prompt or ""}]
        if spec.max_tokens is not None:
            # The field vllm bench sends for chat; max_tokens is its deprecated alias.
            body["max_completion_tokens"] = spec.max_tokens
    else:
        body["prompt"] = spec.prompt if spec.prompt is not None else _flatten(spec.messages or ())
        if spec.max_tokens is not None:
            body["max_tokens"] = spec.max_tokens
    if options.ignore_eos:
        body["ignore_eos"] = True
    if spec.session is not None:
        body["user"] = spec.session
    body.update(options.extra_body)
    return orjson.dumps(body)


def _flatten(messages: tuple[dict[str, Any], ...]) -> str:
    return "\n".join(str(message.get("content") or "") for message in messages)


class _StreamState:
    """Per-request parse state; one `feed` per network read, one timestamp per read."""

    __slots__ = ("buffer", "chat", "content_events", "last_data_at", "last_event_at", "last_tokens", "record",
                 "start", "texts", "want_text")

    def __init__(self, record: RequestResult, start: float, chat: bool, want_text: bool) -> None:
        self.record = record
        self.start = start
        self.chat = chat
        self.want_text = want_text
        self.buffer = b""
        self.last_event_at = start
        # As in vllm bench, E2E runs to the last data event of any kind (the usage-only one included).
        self.last_data_at = start
        self.content_events = 0
        self.last_tokens = 0
        self.texts: list[str] = []

    def feed(self, data: bytes, now: float) -> None:
        buffer = self.buffer + data if self.buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")  # both separators are legal SSE
        if _SEPARATOR not in buffer:
            self.buffer = buffer
            return
        events = buffer.split(_SEPARATOR)
        self.buffer = events.pop()
        for event in events:
            self.event(event, now)

    def finish(self, now: float) -> None:
        # Like vllm bench, accept a last event that lacks its trailing separator.
        if self.buffer.strip():
            self.event(self.buffer, now)
            self.buffer = b""

    def event(self, event: bytes, now: float) -> None:
        if event.startswith(b"data: ") and b"\n" not in event:
            payload = event[6:]  # the shape of nearly every event: one data line, nothing to strip
        else:
            event = event.strip()
            if not event or event.startswith(b":"):
                return  # keep-alive comments carry no data
            payload = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
        record = self.record
        if payload == b"[DONE]":
            record.saw_done = True
            return
        if not payload:
            return
        data = orjson.loads(payload)
        self.last_data_at = now
        choices = data.get("choices")
        usage = data.get("usage")
        if choices:
            # Timed from every event with choices, the role-only first one of a chat included, as vllm bench does.
            if record.ttft_s is None:
                record.ttft_s = now - self.start
            else:
                record.itl_s.append(now - self.last_event_at)
            self.last_event_at = now
            if usage:
                tokens = usage.get("completion_tokens") or 0
                record.chunk_tokens.append(tokens - self.last_tokens)
                self.last_tokens = tokens
            choice = choices[0]
            text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if text:
                self.content_events += 1
                record.content_chars += len(text)
                if self.want_text:
                    self.texts.append(text)
        elif usage:
            record.output_tokens = usage.get("completion_tokens") or 0
            record.prompt_tokens = usage.get("prompt_tokens")
        elif "error" in data:
            record.kind = kinds.STREAM_ERROR
            error = data["error"]
            record.error = str(error.get("message") if isinstance(error, dict) else error)[:500]


async def send_request(
    client: StreamClient, options: ClientOptions, spec: RequestSpec, record: RequestResult, *,
    run_start: float, want_text: bool = False,
) -> str:
    """Send `spec`, fill `record` in place, and return the reply text when `want_text` (for chat histories)."""
    extra = b"x-session-id: %s\r\n" % spec.session.encode("latin-1") if spec.session is not None else b""
    body = build_body(spec, options)
    start = time.perf_counter()
    record.start_s = start - run_start
    state = _StreamState(record, start, options.chat, want_text)
    idle = _IdleCutoff(options.read_timeout_s)

    def take(data: bytes) -> bool:
        now = time.perf_counter()
        idle.last_read = now
        state.feed(data, now)
        return True

    try:
        with idle:
            async with asyncio.timeout(options.request_timeout_s):
                answer = await client.post(body, take, extra)
        record.status = answer.status
        if answer.status != 200:
            record.kind = kinds.http_kind(answer.status)
            record.error = answer.body[:500].decode("utf-8", "replace")
            record.latency_s = time.perf_counter() - start
            return ""
        state.finish(time.perf_counter())
    except asyncio.CancelledError:
        if not idle.cut:
            record.kind, record.error = kinds.CANCELLED, "cancelled at the end of the run"
            raise
        record.kind, record.error = kinds.TIMEOUT, f"nothing received for {options.read_timeout_s:g}s"
    except TimeoutError as exc:
        record.kind, record.error = kinds.TIMEOUT, f"{type(exc).__name__}: {exc}"
    except (wire.WorkerUnreachable, wire.WorkerConnectTimeout) as exc:
        record.kind, record.error = kinds.CONNECT, str(exc)
    except (wire.WorkerHungUp, wire.WorkerBodyCut, ConnectionError) as exc:
        record.kind, record.error = kinds.RESET, f"{type(exc).__name__}: {exc}"
    except (wire.WorkerConnectionError, OSError, ValueError) as exc:
        record.kind, record.error = kinds.CLIENT, f"{type(exc).__name__}: {exc}"
    finally:
        _complete(record, state, start)
    return "".join(state.texts)


class _IdleCutoff:
    """Cancels the request's task when nothing has been received for `limit_s`: one timer per request, moved
    on lazily, rather than a timeout armed and disarmed at every read."""

    __slots__ = ("_handle", "_limit_s", "_task", "cut", "last_read")

    def __init__(self, limit_s: float) -> None:
        self._limit_s = limit_s
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None
        self.last_read = 0.0  # set on entering
        self.cut = False

    def __enter__(self) -> None:
        self._task = asyncio.current_task()
        self.last_read = time.perf_counter()
        self._handle = asyncio.get_running_loop().call_later(self._limit_s, self._check)

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        if self.cut and self._task is not None:
            self._task.uncancel()

    def _check(self) -> None:
        idle_s = time.perf_counter() - self.last_read
        if idle_s < self._limit_s:
            self._handle = asyncio.get_running_loop().call_later(self._limit_s - idle_s, self._check)
            return
        self._handle = None
        self.cut = True
        if self._task is not None:
            self._task.cancel()


def _complete(record: RequestResult, state: _StreamState, start: float) -> None:
    if record.ttft_s is not None:
        record.latency_s = state.last_data_at - start
    elif record.latency_s is None:
        record.latency_s = time.perf_counter() - start
    if record.kind == kinds.OK and record.ttft_s is None:
        record.kind, record.error = kinds.NO_CONTENT, "no event with choices arrived"
    if not record.output_tokens and record.ttft_s is not None:
        # No final usage chunk: fall back to continuous usage, else to counting events with choices.
        if state.last_tokens:
            record.output_tokens = state.last_tokens
        else:
            # One token per event that carried text (a chat's role-only first event carries none).
            record.output_tokens = state.content_events
            record.tokens_estimated = True
