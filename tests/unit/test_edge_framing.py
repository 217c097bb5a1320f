"""Malformed HTTP/1.1 framing at the edge is answered with the 400 envelope, and the edge serves on."""

from __future__ import annotations

import pytest

from tests.unit.edgefakes import Edge, refused, served


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
