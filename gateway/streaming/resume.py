"""Mid-stream failover, the request side: whether a stream can be resumed on another worker, the request that
continues it from the text the client already has, and the rewrite that splices the continuation's events into
the client's stream.

Contract: the continuation asks the next worker to go on from exactly the text sent so far (chat: that text as a
partial assistant message with `continue_final_message`; completions: appended to the prompt), with `max_tokens`
reduced by the tokens already sent and the same seed and sampling. The spliced events keep the stream's id, drop
the continuation's opening role chunk, and carry usage as one request's: the original prompt's tokens and every
output token, before and after. A request that cannot be continued from its text (several choices, a prompt of
token ids, `echo`, tool calls already streamed) is not resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.schemas import OpenAICall
from gateway.upstream.sse import Event

TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
Rewrite = Callable[[Event], Event | None]


def resumable(call: OpenAICall) -> bool:
    body = call.body
    if body.get("n") not in (None, 1) or body.get("echo") or body.get("best_of") not in (None, 1):
        return False
    if call.kind == "completion":
        return isinstance(body.get("prompt"), str)
    return not body.get("continue_final_message")


def continuation_body(call: OpenAICall, text: str, tokens_sent: int) -> dict[str, Any] | None:
    """The body that continues `call` after `text` (`tokens_sent` tokens), or None when nothing is left to ask."""
    body = dict(call.body)
    for field in TOKEN_FIELDS:
        if isinstance(body.get(field), int):
            left = body[field] - tokens_sent
            if left < 1:
                return None
            body[field] = left
    if call.kind == "completion":
        body["prompt"] = body["prompt"] + text
    else:
        body["messages"] = [*body["messages"], {"role": "assistant", "content": text}]
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    if call.stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True,
                                  "continuous_usage_stats": True}
    return body


def has_tool_calls(sent: bytes) -> bool:
    return b'"tool_calls"' in sent


def splice(stream_id: str | None, prompt_tokens: int, tokens_before: int) -> Rewrite:
    """The rewrite of a continuation's events into the client's stream."""

    def rewrite(event: Event) -> Event | None:
        payload = event.payload
        if payload is None:
            return event
        choices = payload.get("choices")
        if choices and _opening_role_chunk(choices[0]):
            return None
        if stream_id is not None and "id" in payload:
            payload["id"] = stream_id
        usage = payload.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            completion = usage["completion_tokens"] + tokens_before
            usage.update(prompt_tokens=prompt_tokens, completion_tokens=completion,
                         total_tokens=prompt_tokens + completion)
        return Event(b"data: " + orjson.dumps(payload), payload, is_error=event.is_error,
                     has_content=event.has_content)

    return rewrite


def _opening_role_chunk(choice: Any) -> bool:
    delta = choice.get("delta") if isinstance(choice, dict) else None
    return isinstance(delta, dict) and "role" in delta and not delta.get("content") and not choice.get(
        "finish_reason")


def first_stream_id(sent: bytes) -> str | None:
    """The id the client's stream started with."""
    start = sent.find(b"data: ")
    end = sent.find(b"\n\n", start)
    if start < 0 or end < 0:
        return None
    try:
        payload = orjson.loads(sent[start + 6:end])
    except orjson.JSONDecodeError:
        return None
    found = payload.get("id") if isinstance(payload, dict) else None
    return found if isinstance(found, str) else None
