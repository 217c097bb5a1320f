"""The edge's limits, bound to the uvicorn it was checked on, and its 431 for oversized heads over raw sockets."""

from __future__ import annotations

import contextlib

import orjson
import pytest
import uvicorn

from gateway.edge import EdgeLimits, EdgeProtocol, edge_protocol, uvicorn_version_tested
from tests.unit.edgefakes import HEAD_BYTES, LIMITS, MAX_HEADERS, Edge, Reader, refused, request, served


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
