"""The edge tests' harness: an echo app under uvicorn with the edge protocol, and HTTP/1.1 over raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn

from gateway.edge import EdgeLimits, edge_protocol
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
