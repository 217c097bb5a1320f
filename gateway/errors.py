"""The gateway's one exception tree. A `GatewayError` is rendered as an OpenAI error envelope with its status
before a response starts, and as one final SSE error event after. The rest are signals that never reach a client
as such: the client left, or a guarded wait ran out (its user turns it into one of the errors).

    GatewayError (500 internal_error)
    ├── InvalidRequest (400)
    ├── AuthenticationFailed (401)
    ├── PermissionDenied (403)             a key that may not call /admin/*
    ├── NotFound (404) ── ModelNotFound
    ├── MethodNotAllowed (405)
    ├── RequestTimedOut (408)              the HTTP edge: a request head or body that stalls
    ├── RequestTooLarge (413)
    ├── HeadersTooLarge (431)
    ├── Overloaded (429) ── WorkersBusy    admission full; every worker answered 429 (their Retry-After)
    │                    └─ RateLimited    a key over its RPM, TPM, concurrency or daily budget (tenants/)
    ├── UpstreamRejected (the worker's 4xx, its envelope passed on)
    ├── UpstreamFailed (502)               upstream/http1/errors.py: the worker client's own, each one of these:
    │   └── WorkerConnectionError             WorkerUnreachable, WorkerConnectTimeout, WorkerHungUp,
    │                                         WorkerBodyCut, WorkerBadResponse, WorkerReadTimeout (also 504)
    ├── UpstreamTimeout (504)
    ├── NoWorkerAvailable (503)
    ├── UsageUnavailable (503)             GET /admin/usage while the limit store cannot answer
    ├── RoutesUnavailable (503)            a route change the shared routes store cannot record
    └── ShuttingDown (503)
    ClientDisconnected                     the client went away: counted (499), never answered
    WaitTooLong, DeadlinePassed            a WaitGuard's limit or the drain's deadline (admission/deadlines.py)
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class GatewayError(Exception):
    """Base of every failure the gateway reports to a client."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after_s = retry_after_s
        self.extra_headers = headers

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers) if self.extra_headers else {}
        if self.retry_after_s is not None:
            headers["retry-after"] = str(self.retry_after_s)
        return headers

    def sse_event(self) -> bytes:
        """The one final event a stream carries when it fails after bytes went out."""
        return b"data: " + self.body() + b"\n\n"

    @property
    def http_status(self) -> int:
        return self.status

    @property
    def metric_status(self) -> str:
        return str(self.http_status)


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTooLarge(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class Overloaded(GatewayError):
    """Admission queue full or waited too long."""

    status = 429
    error_type = "rate_limit_error"
    default_code = "gateway_overloaded"


class WorkersBusy(Overloaded):
    """Every worker that could take the request answered 429: their own Retry-After goes to the client."""

    default_code = "worker_overloaded"


class RateLimited(Overloaded):
    """A key over one of its limits; its Retry-After is the time until this request would fit."""

    default_code = "rate_limit_exceeded"


class NoWorkerAvailable(GatewayError):
    status = 503
    error_type = "service_unavailable"
    default_code = "no_worker_available"


class UpstreamFailed(GatewayError):
    """A worker could not be reached, reset the connection, or answered 5xx."""

    status = 502
    error_type = "upstream_error"
    default_code = "upstream_failed"


class UpstreamTimeout(GatewayError):
    status = 504
    error_type = "upstream_timeout"
    default_code = "upstream_timeout"


class UsageUnavailable(GatewayError):
    status = 503
    error_type = "service_unavailable"
    default_code = "usage_unavailable"


class RoutesUnavailable(GatewayError):
    status = 503
    error_type = "service_unavailable"
    default_code = "routes_unavailable"


class ShuttingDown(GatewayError):
    status = 503
    error_type = "service_unavailable"
    default_code = "shutting_down"

    def __init__(self, message: str = "the gateway is shutting down; retry the request", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)


class UpstreamRejected(GatewayError):
    """A worker's own 4xx answer with its status: its body unchanged when it is an OpenAI error envelope (as
    vLLM's are), else its text in one (a proxy's HTML page, say), so clients always get the envelope."""

    error_type = "invalid_request_error"

    def __init__(self, status: int, raw_body: bytes) -> None:
        super().__init__(raw_body.decode("utf-8", "replace")[:500])
        self.upstream_status = status
        self.raw_body = raw_body

    def body(self) -> bytes:
        try:
            parsed = orjson.loads(self.raw_body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return self.raw_body
        return super().body()

    @property
    def http_status(self) -> int:
        return self.upstream_status


class ClientDisconnected(Exception):
    """The client went away; not an error to report, only to count and to stop upstream work."""


class HeadersTooLarge(GatewayError):
    """The request head outgrew the gateway's limits (gateway/edge.py)."""

    status = 431
    error_type = "invalid_request_error"
    default_code = "request_header_fields_too_large"


class RequestTimedOut(GatewayError):
    """The client did not finish sending its request in time (gateway/edge.py)."""

    status = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class WaitTooLong(TimeoutError):
    """One guarded wait lasted longer than its guard's limit (admission/deadlines.py)."""


class DeadlinePassed(TimeoutError):
    """The guard's deadline passed: the shutdown drain's end."""
