"""The gateway's HTTP edge (gateway/edge.py) on a real uvicorn over raw sockets: bounded heads, head and body
timeouts, and malformed framing answered with the OpenAI error envelope. Each test fails on stock uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import uvicorn

from gateway.edge import EdgeLimits, EdgeProtocol, edge_protocol, uvicorn_version_tested
from tests.support import free_port, wait_until

HEAD_BYTES = 8192
MAX_HEADERS = 20
HEADER_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 1.5
LIMITS = EdgeLimits(HEAD_BYTES, MAX_HEADERS, HEADER_TIMEOUT_S, BODY_TIMEOUT_S)
PATIENCE_S = 15.0  # upper bound for anything expected to happen; only ever reached on failure


@dataclass
class EchoApp:
    """Reads the whole body and answers its size; `/early` answers before reading, `/slow-reader` reads late.
    Records what it saw."""

    disconnected: set[str] = field(default_factory=set)
    cycle_types: list[str] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        path = scope["path"]
        self.cycle_types.append(type(getattr(send, "__self__", None)).__name__)
        if path == "/slow-reader":
            await asyncio.sleep(BODY_TIMEOUT_S * 2.5)  # leaves the body unread for longer than a body may stall
        if path == "/early":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"started", "more_body": True})
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected.add(path)
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = orjson.dumps({"path": path, "bytes": size})
        if path == "/early":
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


@dataclass
class Edge:
    port: int
    app: EchoApp

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=PATIENCE_S)


@contextlib.contextmanager
def edge_server(limits: EdgeLimits) -> Iterator[Edge]:
    app = EchoApp()
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off",
                            http=edge_protocol(limits), timeout_keep_alive=60)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started or not thread.is_alive(), timeout_s=PATIENCE_S) and server.started
        yield Edge(port, app)
    finally:
        server.should_exit = True
        thread.join(timeout=PATIENCE_S)


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    with edge_server(LIMITS) as running:
        yield running


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def envelope(self) -> dict[str, Any]:
        assert self.headers["content-type"] == "application/json"
        parsed: dict[str, Any] = orjson.loads(self.body)
        assert set(parsed) == {"error"}
        assert set(parsed["error"]) == {"message", "type", "param", "code"}
        assert parsed["error"]["type"] == "invalid_request_error" and parsed["error"]["param"] is None
        assert isinstance(parsed["error"]["message"], str) and parsed["error"]["message"]
        error: dict[str, Any] = parsed["error"]
        return error


class Reader:
    """Reads HTTP/1.1 responses (content-length bodies) off one socket, keeping what is left over."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _more(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            assert self._more(), f"connection closed before a response head: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            assert self._more(), "connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(int(status_line.split()[1]), headers, body)

    def closed(self) -> bool:
        """True once the peer has closed (EOF or reset) with nothing more sent; waits up to the socket timeout."""
        try:
            while self._more():
                pass
        except TimeoutError:
            return False
        return True


def request(path: str = "/", extra: str = "", method: str = "GET", body: bytes = b"") -> bytes:
    length = f"content-length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nhost: edge\r\n{length}{extra}\r\n".encode() + body


def refused(sock: socket.socket, status: int, code: str) -> dict[str, Any]:
    """The connection's one answer is the envelope with `status` and `code`, and then it closes."""
    reader = Reader(sock)
    answer = reader.response()
    assert answer.status == status
    assert answer.headers["connection"] == "close"
    error = answer.envelope()
    assert error["code"] == code
    assert reader.buffer == b"" and reader.closed()
    return error


def served(edge: Edge, path: str = "/", body: bytes = b"") -> dict[str, Any]:
    with edge.connect() as sock:
        sock.sendall(request(path, method="POST" if body else "GET", body=body))
        answer = Reader(sock).response()
    assert answer.status == 200
    parsed: dict[str, Any] = orjson.loads(answer.body)
    return parsed


def test_written_against_this_uvicorn() -> None:
    assert uvicorn_version_tested(), f"gateway/edge.py has not been checked against uvicorn {uvicorn.__version__}"
    assert not uvicorn_version_tested("0.28.1") and not uvicorn_version_tested("1.0.0")
    assert uvicorn_version_tested("0.29.0") and not uvicorn_version_tested("garbage")


def test_limits_default_and_bound_into_the_class() -> None:
    assert EdgeLimits() == EdgeLimits(64 * 1024, 100, 10.0, 30.0)
    bound = edge_protocol(LIMITS)
    assert issubclass(bound, EdgeProtocol) and bound.limits == LIMITS and EdgeProtocol.limits == EdgeLimits()
    with pytest.raises(ValueError):
        EdgeLimits(max_headers=0)
    with pytest.raises(ValueError):
        EdgeLimits(body_timeout_s=0)


def test_one_huge_header_gets_431_without_reading_it_all(edge: Edge) -> None:
    with edge.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: edge\r\nx-big: ")
        sent = 0
        with contextlib.suppress(OSError):  # the server closes while we still send: reset or broken pipe
            while sent < 8 * 1024 * 1024:
                sent += sock.send(b"a" * 65536)
        refused(sock, 431, "request_header_fields_too_large")


def test_too_many_headers_get_431_and_the_limit_itself_is_served(edge: Edge) -> None:
    fields = "".join(f"x-h{i}: v\r\n" for i in range(MAX_HEADERS - 1))  # with host: exactly the limit
    with edge.connect() as sock:
        sock.sendall(request(extra=fields))
        assert Reader(sock).response().status == 200
    with edge.connect() as sock:
        sock.sendall(request(extra=fields + "x-one-more: v\r\n"))
        error = refused(sock, 431, "request_header_fields_too_large")
    assert str(MAX_HEADERS) in error["message"]


def test_head_bound_is_exact_and_counts_only_heads(edge: Edge) -> None:
    def head_of(size: int, path: str = "/") -> bytes:
        bare = request(path, extra="x-pad: \r\n")
        return request(path, extra="x-pad: " + "p" * (size - len(bare)) + "\r\n")

    assert len(head_of(HEAD_BYTES)) == HEAD_BYTES
    with edge.connect() as sock:
        sock.sendall(head_of(HEAD_BYTES))
        assert Reader(sock).response().status == 200
    with edge.connect() as sock:
        sock.sendall(head_of(HEAD_BYTES + 1))
        refused(sock, 431, "request_header_fields_too_large")
    # A body that arrives in the head's read is not head: parsing stops at the budget, then goes on.
    body = b"b" * (HEAD_BYTES * 25)
    assert served(edge, "/big", body) == {"path": "/big", "bytes": len(body)}
    # Nor is the next request's head: each pipelined head has the whole budget, in one read or not.
    with edge.connect() as sock:
        sock.sendall(b"".join(head_of(HEAD_BYTES - 10, f"/p{i}") for i in range(3)))
        reader = Reader(sock)
        paths = [orjson.loads(reader.response().body)["path"] for _ in range(3)]
    assert paths == ["/p0", "/p1", "/p2"]


def test_half_sent_heads_time_out_with_408_while_others_are_served(edge: Edge) -> None:
    started = time.monotonic()
    silent = edge.connect()
    partial = [edge.connect() for _ in range(10)]
    with silent, contextlib.ExitStack() as stack:
        for sock in partial:
            stack.enter_context(sock)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\ncontent-le")
        assert served(edge, "/meanwhile") == {"path": "/meanwhile", "bytes": 0}
        for sock in [silent, *partial]:
            error = refused(sock, 408, "header_timeout")
            assert f"{HEADER_TIMEOUT_S:g} s" in error["message"]
        assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.9


def test_body_timeout_is_idle_time_between_bytes_and_disconnects_the_app(edge: Edge) -> None:
    pieces = 20
    with edge.connect() as sock:
        sock.sendall(f"POST /trickle HTTP/1.1\r\nhost: edge\r\ncontent-length: {pieces}\r\n\r\n".encode())
        started = time.monotonic()
        for _ in range(pieces):
            time.sleep(BODY_TIMEOUT_S / 15)  # the trickle's pace, not synchronisation
            sock.sendall(b"t")
        assert time.monotonic() - started > BODY_TIMEOUT_S
        answer = Reader(sock).response()
    assert answer.status == 200 and orjson.loads(answer.body) == {"path": "/trickle", "bytes": pieces}

    with edge.connect() as sock:
        sock.sendall(b"POST /stalled HTTP/1.1\r\nhost: edge\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        started = time.monotonic()
        error = refused(sock, 408, "body_timeout")
        assert time.monotonic() - started >= BODY_TIMEOUT_S * 0.9
    assert f"{BODY_TIMEOUT_S:g} s" in error["message"]
    assert wait_until(lambda: "/stalled" in edge.app.disconnected, timeout_s=PATIENCE_S)


def test_body_is_not_timed_while_the_app_is_not_reading_it(edge: Edge) -> None:
    """uvicorn stops reading once 64 KiB wait for the app: the client cannot send then, so that is no stall."""
    body = b"s" * (1024 * 1024)
    assert served(edge, "/slow-reader", body) == {"path": "/slow-reader", "bytes": len(body)}
    with edge.connect() as sock:  # and the edge still times out a body that does stall
        sock.sendall(b"POST /slow-reader HTTP/1.1\r\nhost: edge\r\ncontent-length: 9\r\n\r\nx")
        refused(sock, 408, "body_timeout")


def test_stalled_body_after_the_response_started_closes_without_a_second_status_line(edge: Edge) -> None:
    with edge.connect() as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nhost: edge\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        reader = Reader(sock)
        assert reader.closed()
    assert wait_until(lambda: "/early" in edge.app.disconnected, timeout_s=PATIENCE_S)
    assert reader.buffer.startswith(b"HTTP/1.1 200 ") and reader.buffer.count(b"HTTP/1.1") == 1


def test_keep_alive_requests_are_unaffected_and_each_head_gets_its_own_deadline(edge: Edge) -> None:
    with edge.connect() as sock:
        reader = Reader(sock)
        opened = time.monotonic()
        for i in range(4):
            sock.sendall(request(f"/k{i}"))
            answer = reader.response()
            assert answer.status == 200 and orjson.loads(answer.body)["path"] == f"/k{i}"
            # Idle between requests for longer than a head may take: that is keep-alive, not a slow head.
            time.sleep(HEADER_TIMEOUT_S * 0.6)
        assert time.monotonic() - opened > 2 * HEADER_TIMEOUT_S
        sock.sendall(b"GET /late HTTP/1.1\r\nhost: ed")  # the next head, half-sent: its deadline runs from here
        started = time.monotonic()
        error = refused(sock, 408, "header_timeout")
        assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.9
    assert "was not complete" in error["message"]
    # streaming/uvicorn_fast_path.py writes streamed bodies straight to uvicorn's RequestResponseCycle: still that.
    assert edge.app.cycle_types and set(edge.app.cycle_types) == {"RequestResponseCycle"}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"POST / HTTP/1.1\r\nhost: edge\r\ncontent-length: abc\r\n\r\n", id="bad-content-length"),
        pytest.param(b"POST / HTTP/1.1\r\nhost: edge\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n\r\n", id="content-length-and-transfer-encoding"),
        pytest.param(b"POST / HTTP/1.1\r\nhost: edge\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                     id="bad-chunk-size"),
        pytest.param(b"HELLO THERE\r\n\r\n", id="garbage-request-line"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, id="tls-hello-on-plain-port"),
        pytest.param(b"GET / HTTP/1.1\r\nhost: edge\r\nbad header\r\n\r\n", id="header-without-colon"),
    ],
)
def test_malformed_framing_gets_the_400_envelope(edge: Edge, raw: bytes) -> None:
    with edge.connect() as sock:
        sock.sendall(raw)
        refused(sock, 400, "invalid_http_request")
    assert served(edge, "/after") == {"path": "/after", "bytes": 0}
