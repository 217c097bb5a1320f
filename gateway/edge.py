"""The HTTP/1.1 protocol the gateway serves with: uvicorn's httptools protocol with bounds.

Stock uvicorn takes a request head of any size with any number of headers, waits forever for a head or a
body that stalls, and answers malformed framing with a plain-text 400. `EdgeProtocol` is that protocol with:

- a head size bound: at most `max_header_bytes` bytes from the first byte of a request to the end of its head,
  counted as bytes arrive, so the parser never holds more (one read more at most, when a read carries the end
  of a body and the start of the next head), and at most `max_headers` header fields (trailers count too);
  beyond either: 431;
- a head deadline: a head not complete `header_timeout_s` after the connection opened (its first request) or
  after its first byte (a later request on a kept-alive connection): 408. Idle time between requests stays
  uvicorn's (`timeout_keep_alive`); a head sent while an earlier response is still going waits for it;
- a body idle timeout: no body bytes for `body_timeout_s` while the client could send (reading not paused by
  flow control, no 100-continue owed): the app's `receive()` answers `http.disconnect` at once, the client
  gets 408 if its response has not started, and the connection closes;
- every refusal, uvicorn's 400s included, as the OpenAI error envelope (gateway/errors.py) with
  `content-type: application/json` and `connection: close`, then the connection closes; never a 5xx. A refusal
  that cannot be answered in order (its response started, or an earlier request's response still owed)
  closes the connection without writing.

Contract: pass `edge_protocol(limits)` as `uvicorn.Config(http=...)`. Only request-parsing callbacks do work:
one `loop.call_later` handle per connection, armed at a head's start and cancelled when its request has been
read, and re-armed lazily (a body chunk only stores the time). The response path, uvicorn's
`RequestResponseCycle` (streaming/uvicorn_fast_path.py relies on it), is uvicorn's own and unchanged. Written
against the uvicorn versions in `TESTED_UVICORN`; tests/unit/test_edge_head_limits.py fails on any other.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Final

import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from gateway.errors import GatewayError, HeadersTooLarge, InvalidRequest, RequestTimedOut

logger = logging.getLogger(__name__)

# The uvicorn (major, minor) range this was checked against. It relies on HttpToolsProtocol's parser callbacks,
# `data_received` / `send_400_response` / `connection_lost`, its `parser`, `cycle`, `pipeline`, `flow`, `loop`,
# and the cycle's `disconnected`, `message_event`, `response_started`, `response_complete` and
# `waiting_for_100_continue`.
TESTED_UVICORN: Final[tuple[tuple[int, int], tuple[int, int]]] = ((0, 29), (0, 55))

_HEAD: Final = 0  # waiting for or reading a request head: the size budget and the head deadline apply
_BODY: Final = 1  # reading a request's body: the body idle timeout applies
_IDLE: Final = 2  # the request has been read and the next head has not begun: nothing is timed here
# While the client cannot send (reading paused, 100-continue owed), how often the body timer looks again.
_PAUSED_RECHECK_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """What one request may take of the gateway before it is refused."""

    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # Past this many bytes queued for a client its stream waits (uvicorn's flow control) instead of queueing more.
    client_write_buffer_bytes: int = 4 * 1024

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1 or self.max_headers < 1:
            raise ValueError("max_header_bytes and max_headers must be at least 1")
        if not (self.header_timeout_s > 0 and self.body_timeout_s > 0):
            raise ValueError("header_timeout_s and body_timeout_s must be positive")


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the refusal is already on the protocol."""


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded heads, head and body timeouts, and enveloped refusals."""

    limits: ClassVar[EdgeLimits] = EdgeLimits()

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: EdgeLimits | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = limits or self.limits
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._header_timeout = limits.header_timeout_s
        self._body_timeout = limits.body_timeout_s
        self._write_buffer = limits.client_write_buffer_bytes
        self._phase: int = _HEAD
        self._budget = limits.max_header_bytes  # bytes the current head may still take
        self._header_count = 0
        self._progress = 0.0  # loop time of the body's last bytes
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: GatewayError | None = None  # set by a callback before it stops the parser

    # Connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=self._write_buffer)
        self._arm(self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = _IDLE
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while self._phase != _BODY:
            budget = self._budget
            if len(data) <= budget:
                self._budget = budget - len(data)
                break
            # The head would outgrow its budget within this read: parse up to the budget, then look again.
            self._budget = 0
            super().data_received(data[:budget])
            if self.parser is None or self.transport.is_closing() or self.parser.should_upgrade():
                return
            if self._budget == 0 and self._phase != _BODY:  # the same head, still not complete
                self._refuse(HeadersTooLarge(f"The request head is larger than {self._max_header_bytes} bytes."))
                return
            data = data[budget:]
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            refusal = InvalidRequest(
                f"{msg.rstrip('.')}: malformed request line, header or body framing.", code="invalid_http_request"
            )
        self._refuse(refusal)

    def handle_websocket_upgrade(self) -> None:
        self._phase = _IDLE
        self._disarm()
        super().handle_websocket_upgrade()

    # Parser callbacks
    def on_message_begin(self) -> None:
        if self._phase != _HEAD:  # a later request on this connection: its head's deadline runs from here
            self._phase = _HEAD
            self._arm(self._header_timeout)
        self._header_count = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self._max_headers:
            self._refusal = HeadersTooLarge(f"The request has more than {self._max_headers} header fields.")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._phase = _BODY
        self._progress = self.loop.time()  # the head timer stays armed; on firing it looks at the body

    def on_body(self, body: bytes) -> None:
        self._progress = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        self._budget = self._max_header_bytes
        self._disarm()
        super().on_message_complete()

    # Timer: one handle per connection
    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.parser is None or self.transport.is_closing():
            return
        cycle: RequestResponseCycle | None = self.cycle  # None until the connection's first head completes
        if self._phase == _HEAD:
            if cycle is not None and not cycle.response_complete:
                self._arm(self._header_timeout)  # a pipelined head: it waits for the response before it
                return
            seconds = f"{self._header_timeout:g}"
            self._refuse(
                RequestTimedOut(f"The request head was not complete within {seconds} s.", code="header_timeout")
            )
        elif self._phase == _BODY:
            now = self.loop.time()
            if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
                self._progress = now  # the client cannot send: not its stall
                self._arm(min(self._body_timeout, _PAUSED_RECHECK_S))
            elif now - self._progress < self._body_timeout:
                self._arm(self._progress + self._body_timeout - now)
            else:
                seconds = f"{self._body_timeout:g}"
                self._refuse(
                    RequestTimedOut(f"The request body made no progress for {seconds} s.", code="body_timeout")
                )

    # Refusals
    def _refuse(self, error: GatewayError) -> None:
        """Answer `error` if it can be answered in order, end the request the app holds, close."""
        cycle: RequestResponseCycle | None = self.cycle
        if self._phase == _BODY:  # about the request being read, whose cycle is `self.cycle`
            owed = cycle is not None and not cycle.response_started
        else:  # about a head: `self.cycle` is the previous request's
            owed = cycle is None or cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() answers http.disconnect; its sends write nothing
            cycle.message_event.set()
        self._phase = _IDLE
        self._disarm()
        logger.debug("refused a request: %d %s", error.http_status, error.message)
        if owed and not self.pipeline and not self.transport.is_closing():
            self.transport.write(_answer(error, self.server_state.default_headers))
        self.transport.close()


def _answer(error: GatewayError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The whole HTTP/1.1 response for a refusal: the error envelope, then the connection closes."""
    body = error.body()
    status = error.http_status
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode("ascii"))]
    parts.extend(b"%s: %s\r\n" % (name, value) for name, value in default_headers)
    parts.extend(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in error.headers().items())
    parts.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    parts.append(body)
    return b"".join(parts)


def uvicorn_version_tested(version: str = uvicorn.__version__) -> bool:
    """Whether `version` is in the range this protocol was checked against (`TESTED_UVICORN`)."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    low, high = TESTED_UVICORN
    return low <= major_minor <= high


def edge_protocol(limits: EdgeLimits) -> type[EdgeProtocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`: `EdgeProtocol` with `limits` bound."""
    if not uvicorn_version_tested():
        logger.warning(
            "gateway/edge.py was checked against uvicorn %s to %s, not %s",
            ".".join(map(str, TESTED_UVICORN[0])), ".".join(map(str, TESTED_UVICORN[1])), uvicorn.__version__,
        )

    class BoundEdgeProtocol(EdgeProtocol):
        pass

    BoundEdgeProtocol.limits = limits
    return BoundEdgeProtocol
