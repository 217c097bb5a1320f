"""The edge's head and body timeouts (408) over raw sockets, and keep-alive idle time left alone."""

from __future__ import annotations

import contextlib
import time

import orjson

from tests.support import wait_until
from tests.unit.edgefakes import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, PATIENCE_S, Edge, Reader, refused, request, served


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
