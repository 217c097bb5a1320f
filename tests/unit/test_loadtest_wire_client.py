"""The load generator's transport (loadtest/wire_client.py): what it sends, how it times, how it fails."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from loadtest.fake_config import FakeEngineConfig, FaultConfig
from loadtest.fake_engine import FakeEngine, run_in_thread
from loadtest.records import RequestRecord, RequestSpec
from loadtest.runner import LoadConfig, run_scenario
from loadtest.sse_client import ClientOptions, send_request
from loadtest.wire_client import Endpoint, StreamClient
from loadtest.workloads import RandomPrompts

SSE_ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
              b"%x\r\n%b\r\n0\r\n\r\n")
EVENT = b'data: {"choices":[{"index":0,"text":"x"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'


@contextlib.contextmanager
def raw_server() -> Iterator[tuple[str, list[bytes]]]:
    """A loopback server that answers a connection's first request with one SSE event and closes it on reading
    the second, unanswered: a keep-alive connection that the server dropped as the client reused it."""
    listener = socket.create_server(("127.0.0.1", 0))
    heads: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                for answered in (True, False):
                    data = b""
                    while b"\r\n\r\n" not in data and (received := connection.recv(65536)):
                        data += received
                    if b"\r\n\r\n" not in data:
                        break  # the client closed the connection
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length")))
                    while len(body) < length:
                        body += connection.recv(65536)
                    heads.append(head)
                    if not answered:
                        break
                    connection.sendall(SSE_ANSWER % (len(EVENT), EVENT))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/completions", heads
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_the_request_head_carries_the_options_headers_once_and_the_session() -> None:
    endpoint = Endpoint.of("http://127.0.0.1:9/v1/chat/completions?x=1",
                           (("Authorization", "Bearer k"), ("Content-Type", "text/plain")))
    head = endpoint.head.decode()
    assert head.startswith("POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\n")
    assert "Authorization: Bearer k\r\n" in head
    assert head.lower().count("content-type") == 1
    secure = Endpoint.of("https://example.test/v1/completions", ())
    assert (secure.tls, secure.port) == (True, 443) and not endpoint.tls
    with pytest.raises(ValueError, match="not an http"):
        Endpoint.of("ftp://127.0.0.1/v1/completions", ())


def test_a_reused_connection_the_server_dropped_is_replaced_and_the_request_succeeds() -> None:
    async def two_requests(url: str) -> list[RequestRecord]:
        options = ClientOptions(url=url, model="m", chat=False)
        client = StreamClient(url)
        records = [RequestRecord(index=i) for i in range(2)]
        try:
            for record in records:
                await send_request(client, options, RequestSpec(prompt="hi", max_tokens=1, session="u-1"), record,
                                   run_start=0.0)
        finally:
            await client.aclose()
        return records

    with raw_server() as (url, heads):
        records = asyncio.run(two_requests(url))
    assert [r.kind for r in records] == ["ok", "ok"]
    assert [r.output_tokens for r in records] == [1, 1]
    # The second request went out twice: on the dropped connection, then on a new one.
    assert len(heads) == 3 and all(b"\r\nx-session-id: u-1" in head for head in heads)


def test_a_silent_stream_ends_at_the_read_timeout_as_a_timeout() -> None:
    faults = FaultConfig.from_mapping({"stall": 1.0}, after_events=2, stall_s=30.0)
    engine = FakeEngine(FakeEngineConfig(ttft_s=0, gap_s=0.001, output_len=8, faults=faults))
    with run_in_thread(engine) as url:
        result = asyncio.run(run_scenario(LoadConfig(
            base_url=url, progress=False, workload=RandomPrompts(input_len=8, output_len=8), num_requests=2,
            concurrency=2, read_timeout_s=0.3)))
    assert [r.kind for r in result.records] == ["timeout", "timeout"]
    for record in result.records:
        assert record.ttft_s is not None and len(record.itl_s) == 1  # two events came, then silence
        assert "nothing received for 0.3s" in record.error
        assert record.latency_s is not None and record.latency_s < 5


def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    result = asyncio.run(run_scenario(LoadConfig(
        base_url=f"http://127.0.0.1:{port}", progress=False, workload=RandomPrompts(input_len=8, output_len=8),
        num_requests=2)))
    assert [r.kind for r in result.records] == ["connect", "connect"]
