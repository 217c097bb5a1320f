"""Bearer API keys on the API and admin routes, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import AuthenticationFailed

# The admin view lists worker addresses and load: not for anyone who can reach the port.
PROTECTED_PREFIXES = ("/v1/", "/admin/")


def token_matches(presented: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(presented, expected)


class ApiKeyMiddleware:
    """With no keys configured, everything passes; health, readiness and metrics stay open."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self._keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._keys or scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        if self._accepts(bearer_token(scope)):
            await self.app(scope, receive, send)
            return
        error = AuthenticationFailed("Incorrect API key provided")
        await send({
            "type": "http.response.start",
            "status": error.http_status,
            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
        })
        await send({"type": "http.response.body", "body": error.body()})

    def _accepts(self, presented: bytes) -> bool:
        # Check every key so the time taken does not tell which key came close.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        return matched


def bearer_token(scope: Scope) -> bytes:
    """The request's bearer token, b"" without one."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                stripped: bytes = token.strip()
                return stripped
    return b""
