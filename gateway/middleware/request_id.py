"""Gives every response an x-request-id, the client's own when it sent one."""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_CLIENT_ID = 128


class RequestIdMiddleware:
    """Pure ASGI, so streaming and disconnect signals pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        encoded = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                headers.append((HEADER, encoded))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)


def _client_id(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == HEADER:
            text: str = value.decode("latin-1").strip()
            # ASCII only: the id goes back to the client, to the worker and into logs, and must read the same
            # in each (a latin-1 byte would come back as two UTF-8 bytes, or fail an ASCII-only client).
            if 0 < len(text) <= MAX_CLIENT_ID and text.isascii() and text.isprintable():
                return text
    return None
