"""An in-memory WorkerClient: each call goes to a handler function, as httpx's MockTransport does for httpx.

Build the gateway on it with `create_app(settings, worker_client=MockWorkerClient(handler))`. The handler gets a
`WorkerCall` and returns a `MockAnswer` (or an awaitable of one); to fail a call as the network would, it raises
one of upstream/http1/errors.py's errors. A body given as an async iterator is handed out one item per read, as
network reads would be; an error it raises partway is the worker's answer breaking off there.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from gateway.upstream.client import Fetched, WorkerReply


@dataclass(frozen=True, slots=True)
class WorkerCall:
    """One call as the worker would get it."""

    method: str
    worker_url: str
    path: str
    body: bytes = b""
    request_id: str = ""
    streaming: bool = False


@dataclass(slots=True)
class MockAnswer:
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | AsyncIterable[bytes] = b""


Handler = Callable[[WorkerCall], MockAnswer | Awaitable[MockAnswer]]


class MockWorkerClient:
    """Sends every call to `handler`; `closed_early` counts replies closed before their body's end (the signal
    the real client gives a worker to abort), `calls` keeps every call made."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.calls: list[WorkerCall] = []
        self.closed_early = 0

    async def post(self, worker_url: str, path: str, body: bytes, request_id: str, streaming: bool) -> WorkerReply:
        answer = await self._answer(WorkerCall("POST", worker_url, path, body, request_id, streaming))
        chunks = _chunks(answer.body)
        ended = False

        async def read() -> bytes:
            nonlocal ended
            try:
                return await anext(chunks)
            except StopAsyncIteration:
                ended = True
                return b""

        async def close() -> None:
            if not ended:
                self.closed_early += 1

        return WorkerReply(answer.status, {k.lower(): v for k, v in answer.headers.items()}, read, close)

    async def get(self, worker_url: str, path: str, timeout_s: float) -> Fetched:
        answer = await self._answer(WorkerCall("GET", worker_url, path))
        if isinstance(answer.body, bytes):
            return Fetched(answer.status, answer.body)
        return Fetched(answer.status, b"".join([chunk async for chunk in answer.body]))

    async def aclose(self) -> None:
        return None

    async def _answer(self, call: WorkerCall) -> MockAnswer:
        self.calls.append(call)
        answer = self._handler(call)
        if inspect.isawaitable(answer):
            return await answer
        return answer


async def _chunks(body: bytes | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(body, bytes):
        if body:
            yield body
        return
    async for chunk in body:
        if chunk:
            yield chunk
