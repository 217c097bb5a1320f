"""The worker client's failures, each one of the gateway's upstream errors (gateway/errors.py): a failure on the
way to a worker is a 502 before the first byte and one error event after it, a worker that stays silent a 504.
"""

from __future__ import annotations

from gateway.errors import UpstreamFailed, UpstreamTimeout


class WorkerConnectionError(UpstreamFailed):
    """A connection to a worker failed; the subclass says how."""


class WorkerUnreachable(WorkerConnectionError):
    """The connection could not be made: refused, no route, unknown name."""


class WorkerConnectTimeout(WorkerConnectionError):
    """No connection (or no free connection slot) within the connect timeout."""


class WorkerHungUp(WorkerConnectionError):
    """The worker closed the connection before its answer began."""


class WorkerBodyCut(WorkerConnectionError):
    """The worker closed or reset the connection in the middle of its answer."""


class WorkerBadResponse(WorkerConnectionError):
    """What the worker sent is not HTTP/1.1."""


class WorkerReadTimeout(WorkerConnectionError, UpstreamTimeout):
    """A whole (non-streamed) call or a pool call: the worker sent nothing within its wait limit."""

    status = UpstreamTimeout.status
    error_type = UpstreamTimeout.error_type
    default_code = UpstreamTimeout.default_code
