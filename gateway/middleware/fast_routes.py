"""Serves the forwarding routes without Starlette's routing and exception middleware.

A POST to one of these paths goes through the app's user middleware (request id, API keys: the same classes
with the same arguments, built the way Starlette builds them) straight to its handler, and its errors go to the
app's own exception handlers, looked up as Starlette's exception middleware looks them up (an HTTP exception's
status code first, then the exception's class and its bases). Every other request, and any other method on
these paths (405), takes the full stack. What is skipped (Starlette's error and exception middleware, FastAPI's
exit-stack middleware, the router's match over every route, the route's request/response wrapper) costs every
request, and what these routes need of it is done here (docs/design/performance.md, "Per-request trims:
forwarding routes off Starlette's stack").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ClientDisconnected

# The scope key under which a forwarding handler finds the `send` its response goes through (middleware and all),
# to start that response from outside the request's task (gateway/streaming/response.py, `inline_opener`).
APP_SEND = "specgate.app_send"

Endpoint = Callable[[Request], Awaitable[Response]]
ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


class FastRoutes:
    """ASGI app for POST on a fixed set of paths; `serves(scope)` says whether a request is one of them."""

    def __init__(self, endpoints: Mapping[str, Endpoint], handlers: Mapping[Any, Any]) -> None:
        self._endpoints = dict(endpoints)
        # The app's own dict, read at each error: handlers added after the app was built still apply.
        self._handlers = handlers

    def serves(self, scope: Scope) -> bool:
        return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self._endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        scope[APP_SEND] = send_noting_start
        try:
            response = await self._endpoints[scope["path"]](request)
            await response(scope, receive, send_noting_start)
        except Exception as exc:
            handler = self._handler_for(exc)
            if started and isinstance(exc, ClientDisconnected):
                return  # a response started from outside the task, whose client then left: nothing more to send
            if started or handler is None:
                raise  # as under Starlette: once the response has started, only the server can end it
            error_response = await handler(request, exc)
            await error_response(scope, receive, send_noting_start)
        finally:
            # It refers to the server's request cycle, which holds the scope: left in it, a reference cycle.
            del scope[APP_SEND]

    def _handler_for(self, exc: Exception) -> ExceptionHandler | None:
        if isinstance(exc, HTTPException) and exc.status_code in self._handlers:
            by_status: ExceptionHandler = self._handlers[exc.status_code]
            return by_status
        for cls in type(exc).__mro__:
            handler: ExceptionHandler | None = self._handlers.get(cls)
            if handler is not None:
                return handler
        return None


def wrapped_in(middleware: Sequence[Middleware], app: ASGIApp) -> ASGIApp:
    """`app` inside `middleware`, the first one outermost (as Starlette builds its stack)."""
    for cls, args, kwargs in reversed(middleware):
        app = cls(app, *args, **kwargs)
    return app
