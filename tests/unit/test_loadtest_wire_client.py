"""The load generator's transport (loadtest/wire_client.py): what it sends, how it times, how it fails."""

from __future__ import annotations

import asyncio
import socket

import pytest

from loadtest.fake_config import FakeEngineConfig, FaultConfig
from loadtest.fake_engine import FakeEngine, run_in_thread
from loadtest.records import RequestResult, RequestSpec
from loadtest.runner import LoadConfig, run_scenario
from loadtest.sse_client import ClientOptions, send_request
from loadtest.wire_client import Endpoint, StreamClient
from loadtest.workloads import RandomPrompts
from tests.unit.wirefakes import STREAM_HEAD, Handler, chunk, read_request, serving

EVENT = b'data: {"choices":[{"index":0,"text":"x"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'


def answer_once_then_drop(heads: list[bytes]) -> Handler:
    """Answers a connection's first request with one SSE event and closes it on reading the second, unanswered:
    a keep-alive connection that the server dropped as the client reused it."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        heads.append(head)
        writer.write(STREAM_HEAD + chunk(EVENT) + b"0\r\n\r\n")
        await writer.drain()
        head, _ = await read_request(reader)
        heads.append(head)

    return handle


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
    heads: list[bytes] = []

    async def two_requests() -> list[RequestResult]:
        async with serving(answer_once_then_drop(heads)) as worker:
            url = worker.url + "/v1/completions"
            options = ClientOptions(url=url, model="m", chat=False)
            client = StreamClient(url)
            records = [RequestResult(index=i) for i in range(2)]
            try:
                for record in records:
                    await send_request(client, options, RequestSpec(prompt="hi", max_tokens=1, session="u-1"),
                                       record, run_start=0.0)
            finally:
                await client.aclose()
        return records

    records = asyncio.run(two_requests())
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
