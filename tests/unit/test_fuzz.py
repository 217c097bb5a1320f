"""A corpus of hostile requests against the gateway as `specgate gateway` serves it: bodies, framing, headers,
methods and paths. None may be answered with a 5xx, every 4xx is an OpenAI error envelope, and nothing is left
held afterwards."""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from gateway.server import server_config
from tests.unit.fakes import MODEL, SlowWorker, free_port, serve_in_thread, settings_for, vllm_stream

SEED = 20261207
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

HOSTILE_VALUES: list[Any] = [
    None, True, -1, 0, 2**63, -(2**63), 1e308, -1e308, 0.5, "", "x" * 70_000, "\u0000", "\ud7ff\ue000",
    "<script>", "../../etc/passwd", [], [None], [[[]]], {}, {"": None}, {"model": MODEL}, [1] * 5000,
    {"a": {"b": {"c": {"d": []}}}}, "%s%n%x", "\u202e", "NaN", 10**18,
]
FIELDS = [
    "model", "messages", "stream", "stream_options", "max_tokens", "n", "temperature", "top_p", "top_k",
    "stop", "logit_bias", "tools", "tool_choice", "response_format", "seed", "user", "priority", "vllm_xargs",
    "logprobs", "top_logprobs", "min_p", "unknown_field", "prompt", "messages.0.role", "messages.0.content",
]


def _nested(depth: int, container: str) -> str:
    return (("[" * depth) + "1" + ("]" * depth)) if container == "list" else ('{"a":' * depth) + "1" + ("}" * depth)


def _mutated_bodies(rng: random.Random, count: int) -> Iterator[bytes]:
    for _ in range(count):
        body: dict[str, Any] = json.loads(json.dumps(CHAT))
        for _ in range(rng.randint(1, 3)):
            field, value = rng.choice(FIELDS), rng.choice(HOSTILE_VALUES)
            if field.startswith("messages.0."):
                body["messages"] = [{**body["messages"][0], field.rsplit(".", 1)[1]: value}] if isinstance(
                    body.get("messages"), list) and body["messages"] and isinstance(body["messages"][0], dict
                ) else [{field.rsplit(".", 1)[1]: value}]
            elif rng.random() < 0.15:
                body.pop(field, None)
            else:
                body[field] = value
        yield json.dumps(body).encode()


def _body_corpus(rng: random.Random) -> list[bytes]:
    fixed = [
        b"", b"{", b"null", b"[]", b'"x"', b"1", b"{}", b'{"model": 1}', b"\xff\xfe{}", b"\xef\xbb\xbf{}",
        b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
        b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "n": 123456789012345678901234567890}',
        b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"model": "demo", "model": "other", "messages": [{"role": "user", "content": "hi"}]}',
        b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n",
    ]
    deep = [
        b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "vllm_xargs": ' + _nested(
            depth, container).encode() + b"}"
        for depth in (62, 63, 64, 65, 200, 253, 254, 255, 300, 1000, 1023, 1024, 1025, 10_000)
        for container in ("dict", "list")
    ]
    return fixed + deep + list(_mutated_bodies(rng, 250))


def _post(body: bytes, path: str = "/v1/chat/completions", extra: bytes = b"") -> bytes:
    return (b"POST %b HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\nconnection: close\r\n%b"
            b"content-length: %d\r\n\r\n%b" % (path.encode(), extra, len(body), body))


def _framing_and_head_corpus() -> list[bytes]:
    ok = json.dumps(CHAT).encode()
    return [
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ncontent-length: abc\r\n\r\n" + ok,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ncontent-length: -5\r\n\r\n" + ok,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\n" + ok,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n"
        b"\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n" + ok
        + b"\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ntransfer-encoding: gzip\r\n\r\n" + ok,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ncontent-length: 99999999999999999999999\r\n\r\n",
        b"NOT A REQUEST\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
        b"GET /v1/models HTTP/9.9\r\nhost: g\r\n\r\n",
        b"GET /v1/models\r\n\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nhost: g\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nhost: g\r\nbad header name: x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nhost: g\r\nx-long: " + b"a" * 200_000 + b"\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nhost: g\r\n" + b"".join(b"x-%d: y\r\n" % n for n in range(5000)) + b"\r\n",
        b"GET /v1/models HTTP/1.1\r\nhost: g\r\nx-nul: a\x00b\r\n\r\n",
        _post(ok, extra=b"authorization: Bearer \xff\xfe\r\n"),
        _post(ok, extra=b"x-request-id: " + b"\xe9" * 300 + b"\r\n"),
        _post(ok, extra=b"x-session-id: " + b"s" * 10_000 + b"\r\n"),
        _post(ok, path="/v1/chat/completions?x=%00&y=" + "z" * 2000),
        _post(ok, path="/v1/../../etc/passwd"),
        _post(ok, path="//v1//chat//completions"),
        _post(ok, path="/v1/chat/completions%00"),
        _post(b"x" * (9 * 1024 * 1024)),
    ]


def _method_and_path_corpus() -> list[bytes]:
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics",
             "/admin/workers", "/v1/embeddings", "/nope", "/%ff", "/v1/models/" + "x" * 500, "*"]
    methods = ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "BREW"]
    return [f"{method} {path} HTTP/1.1\r\nhost: g\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
            for method in methods for path in paths]


def _exchange(port: int, raw: bytes) -> http.client.HTTPResponse | None:
    """Send `raw` and read the answer; None when the server closed without one. The connection stays open for
    writing: a client that half-closes has gone away, as far as a streaming gateway can tell."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before taking it all
            sock.sendall(raw)
        method = raw.split(b" ", 1)[0].decode("latin-1")
        response = http.client.HTTPResponse(sock, method=method if method.isalpha() else "GET")
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None
        with contextlib.suppress(http.client.IncompleteRead, ConnectionResetError):
            response.body = response.read()  # type: ignore[attr-defined]
        return response


@contextlib.contextmanager
def _served_gateway(worker_url: str) -> Iterator[tuple[int, FastAPI]]:
    port = free_port()
    settings = settings_for(worker_url, port=port, log_level="critical", request_log=False, max_concurrency=4,
                            queue_timeout_s=2)
    app = create_app(settings)
    server = uvicorn.Server(server_config(settings, app))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
        time.sleep(0.01)
    try:
        yield port, app
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[int, FastAPI]]:
    with serve_in_thread(SlowWorker(vllm_stream([1, 1]), gap_s=0)) as worker_url, _served_gateway(worker_url) as served:
        yield served


CORPORA = {
    "bodies": lambda: [_post(body) for body in _body_corpus(random.Random(SEED))],
    "completions": lambda: [_post(body, "/v1/completions") for body in _body_corpus(random.Random(SEED + 1))[:120]],
    "framing-and-heads": _framing_and_head_corpus,
    "methods-and-paths": _method_and_path_corpus,
}


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_no_hostile_request_gets_a_5xx_and_every_4xx_is_an_envelope(corpus: str, gateway: tuple[int, FastAPI]) -> None:
    port, app = gateway
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for raw in CORPORA[corpus]():
        response = _exchange(port, raw)
        shown = raw[:80]
        if response is None:
            failures.append(f"no answer to {shown!r}")
            continue
        statuses[response.status] = statuses.get(response.status, 0) + 1
        body: bytes = getattr(response, "body", b"")
        if response.status >= 500:
            failures.append(f"{response.status} for {shown!r}: {body[:200]!r}")
        elif response.status >= 400 and response.getheader("content-length") != "0" and raw[:4] != b"HEAD":
            try:
                error = json.loads(body)["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
            except (ValueError, KeyError, TypeError, AssertionError):
                failures.append(f"{response.status} without the envelope for {shown!r}: {body[:200]!r}")
    assert not failures, "\n".join(failures[:20])
    assert any(400 <= status < 500 for status in statuses), statuses  # the corpus was refused somewhere
    # Nothing held: every slot back, nothing in flight, and the gateway still answers.
    services = app.state.services
    assert services.admission.held == 0
    assert all(worker["in_flight"] == 0 for worker in services.pool.admin_view())
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert all(float(v) == 0 for v in re.findall(r"^specgate_in_flight\{.*\} (\S+)$", metrics, re.MULTILINE))
    ok = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=20)
    assert ok.status_code == 200 and ok.text.rstrip().endswith("[DONE]")
