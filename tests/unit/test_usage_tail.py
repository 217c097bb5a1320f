"""The relay's fast read of a content chunk from its usage member agrees with the whole parse, and leaves every
other event to it."""

from __future__ import annotations

import orjson
import pytest

from gateway.observability.record import RequestRecord
from gateway.streaming.usage import UsageFilter
from gateway.upstream.sse import Event, usage_tail

HEAD = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"demo",'


def chat(content: str, completion: int, usage_extra: bytes = b"") -> bytes:
    delta = orjson.dumps({"content": content})
    return (HEAD + b'"choices":[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":null}],'
            + b'"usage":{"prompt_tokens":7,"total_tokens":%d,"completion_tokens":%d%b}}' % (7 + completion, completion,
                                                                                          usage_extra))


CONTENT_CHUNKS = [
    chat(" the", 1),
    chat(" and then", 3),  # a speculative step: three tokens in one chunk
    chat('"usage":{"x":1}}', 2),  # the member's bytes inside a string come escaped
    chat("{}}}{", 1),
    chat("é中\n", 1),
    chat(" x", 1, b',"prompt_tokens_details":{"cached_tokens":0}'),
    (b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"demo","choices":[{"index":0,'
     b'"text":" os","logprobs":null,"finish_reason":null,"stop_reason":null}],'
     b'"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}'),
]


def whole_parse(raw: bytes, include: bool, continuous: bool) -> tuple[int, bytes | None, RequestRecord]:
    record = RequestRecord(request_id="r", model="demo", endpoint="chat", stream=True, received_at=0.0)
    usage = UsageFilter(include, continuous)
    event = Event.parse(raw)
    assert event.payload is not None
    tokens = usage.tokens_in(event.payload, record, event.has_content)
    return tokens, usage.client_bytes(event), record


@pytest.mark.parametrize("include, continuous", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("raw", CONTENT_CHUNKS)
def test_a_content_chunk_read_from_its_usage_matches_the_whole_parse(raw: bytes, include: bool,
                                                                     continuous: bool) -> None:
    tail = usage_tail(raw)
    assert tail is not None
    record = RequestRecord(request_id="r", model="demo", endpoint="chat", stream=True, received_at=0.0)
    usage = UsageFilter(include, continuous)
    taken = usage.take_tail(tail, record)
    assert taken is not None
    piece, tokens = taken
    want_tokens, want_piece, want_record = whole_parse(raw, include, continuous)
    assert want_piece is not None and piece.endswith(b"\n\n")
    assert tokens == want_tokens > 0
    assert orjson.loads(piece[6:]) == orjson.loads(want_piece[6:])  # the same JSON, without usage unless asked
    assert ("usage" in orjson.loads(piece[6:])) is continuous
    assert (record.prompt_tokens, record.output_tokens) == (want_record.prompt_tokens, want_record.output_tokens)
    assert usage.exact


@pytest.mark.parametrize("raw", [
    b"data: [DONE]",
    b": ping",
    b'data: {"error":{"message":"boom","code":500}}',
    b'data: {"object":"error","message":"boom","choices":[{"index":0}],"usage":{"completion_tokens":1}}',
    chat("error", 1).replace(b'"content":"error"', b'"content":"x","error":"y"'),
    HEAD + b'"choices":[],"usage":{"prompt_tokens":7,"total_tokens":9,"completion_tokens":2}}',  # usage only
    HEAD + b'"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"completion_tokens":1},"extra":1}',
    HEAD + b'"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"completion_tokens":1}',  # cut short
    chat("a", 1).replace(b"data: ", b"data: \n", 1),
    HEAD + b'"choices":[{"index":0,"delta":{"content":"a"}}]}',  # no per-chunk usage
])
def test_every_other_event_is_left_to_the_whole_parse(raw: bytes) -> None:
    assert usage_tail(raw) is None


def test_a_chunk_with_no_new_token_is_left_to_the_whole_parse_and_nothing_is_counted() -> None:
    record = RequestRecord(request_id="r", model="demo", endpoint="chat", stream=True, received_at=0.0)
    usage = UsageFilter(False, False)
    first = usage_tail(chat(" a", 2))
    again = usage_tail(chat("", 2))  # e.g. the chunk that only carries the finish reason
    assert first is not None and again is not None
    assert usage.take_tail(first, record) is not None
    assert usage.take_tail(again, record) is None
    assert record.output_tokens == 2
