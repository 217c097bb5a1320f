"""Bearer API keys on the API and admin routes: the key is looked up by its SHA-256 (tenants/keys_file.py), the
tenant it names put in the request's state for the stages after it, and /admin/* kept to admin keys.

A missing, malformed, unknown or revoked key gets the same 401, whatever the key: the reply does not say whether
a key exists. Health, readiness and metrics stay open (metrics has its own token).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.datastructures import Address
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import AuthenticationFailed, GatewayError, PermissionDenied
from gateway.tenants.keys_file import KeyDirectory, Tenant

# The admin view lists worker addresses and load: not for anyone who can reach the port.
PROTECTED_PREFIXES = ("/v1/", "/admin/")
ADMIN_PREFIX = "/admin/"
TENANT = "tenant"  # the key in the request's state
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def token_matches(presented: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(presented, expected)


class ApiKeyMiddleware:
    """Only installed when keys are configured; `directory` is read per request, so a reload takes effect at once."""

    def __init__(self, app: ASGIApp, directory: Callable[[], KeyDirectory]) -> None:
        self.app = app
        self._directory = directory

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        tenant = self._directory().lookup(bearer_token(scope))
        if tenant is None:
            await _refuse(send, AuthenticationFailed("Incorrect API key provided"))
            return
        if scope["path"].startswith(ADMIN_PREFIX) and not tenant.admin:
            await _refuse(send, PermissionDenied("this key may not call /admin/ endpoints"))
            return
        scope.setdefault("state", {})[TENANT] = tenant
        await self.app(scope, receive, send)


async def _refuse(send: Send, error: GatewayError) -> None:
    headers = [(b"content-type", b"application/json")]
    if error.http_status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": error.body()})


def may_pin(tenant: Tenant | None, no_keys: bool, client: Address | None) -> bool:
    """Who may steer a request past the routes (a pinned version) or change them: an admin key, or with no keys
    configured, a client on this machine."""
    if tenant is not None:
        return tenant.admin
    return no_keys and client is not None and client.host in LOOPBACK


def bearer_token(scope: Scope) -> bytes:
    """The request's bearer token, b"" without one."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                stripped: bytes = token.strip()
                return stripped
    return b""
