"""Fake engine wire format: vLLM-shaped SSE chunks and JSON bodies, assembled from pre-encoded bytes."""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"))
JSON_HEADERS = ((b"content-type", b"application/json"),)

# vLLM serialises with pydantic exclude_unset; these are the fields it sets explicitly, in its field order.
_CHAT_OPEN = b'"choices":[{"index":0,"delta":{"content":"'
_CHAT_MID = b'"},"logprobs":null,"finish_reason":null,"token_ids":null}]'
_CHAT_LAST = b'"},"logprobs":null,"finish_reason":"%s","stop_reason":null,"token_ids":null}]'
_CHAT_ROLE = b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
_ROLE_TAIL = b',"prompt_token_ids":null,"prompt_text":null}\n\n'
_TEXT_OPEN = b'"choices":[{"index":0,"text":"'
_TEXT_MID = b'","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]'
_TEXT_LAST = b'","logprobs":null,"finish_reason":"%s","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]'
_USAGE = b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}'
_END = b"}\n\n"


class ChunkWriter:
    """Bytes of one streamed request; only the token text and the usage numbers change between events."""

    __slots__ = ("_head", "_last", "_mid", "_open", "_prompt_tokens", "chat", "continuous_usage")

    def __init__(self, *, chat: bool, request_id: str, model: str, prompt_tokens: int, continuous_usage: bool) -> None:
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        self._head = (
            b'data: {"id":' + orjson.dumps(request_id) + b',"object":"' + obj + b'","created":'
            + str(int(time.time())).encode() + b',"model":' + orjson.dumps(model) + b","
        )
        self._open = self._head + (_CHAT_OPEN if chat else _TEXT_OPEN)
        self._mid = _CHAT_MID if chat else _TEXT_MID
        self._last = _CHAT_LAST if chat else _TEXT_LAST
        self._prompt_tokens = prompt_tokens
        self.chat = chat
        self.continuous_usage = continuous_usage

    def _usage(self, completion_tokens: int) -> bytes:
        prompt = self._prompt_tokens
        return _USAGE % (prompt, prompt + completion_tokens, completion_tokens)

    def role(self) -> bytes:
        """The first chat chunk: role and empty content, sent with the first token as vLLM does."""
        usage = self._usage(0) if self.continuous_usage else b""
        return self._head + _CHAT_ROLE + usage + _ROLE_TAIL

    def content(self, text: bytes, completion_tokens: int, finish_reason: str | None) -> bytes:
        tail = self._mid if finish_reason is None else self._last % finish_reason.encode()
        usage = self._usage(completion_tokens) if self.continuous_usage else b""
        return self._open + text + tail + usage + _END

    def usage_only(self, completion_tokens: int) -> bytes:
        """The trailing usage chunk of stream_options.include_usage: empty choices."""
        return self._head + b'"choices":[]' + self._usage(completion_tokens) + _END


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def full_response(
    *, chat: bool, request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
    completion_tokens: int,
) -> bytes:
    """A non-streaming chat.completion or text_completion body with usage."""
    choice: dict[str, Any]
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "tool_calls": [],
                                   "reasoning": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason,
                  "stop_reason": None, "token_ids": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                  "stop_reason": None, "prompt_logprobs": None, "prompt_token_ids": None, "token_ids": None}
    body = {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage_dict(prompt_tokens, completion_tokens),
    }
    return orjson.dumps(body)


_ERROR_TYPES = MappingProxyType({400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError",
                                 500: "InternalServerError", 503: "ServiceUnavailableError"})


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """vLLM's ErrorResponse: the OpenAI envelope with the status as code."""
    kind = _ERROR_TYPES.get(status, "InternalServerError")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}})


def models_body(model: str, max_model_len: int) -> bytes:
    created = int(time.time())
    card = {
        "id": model, "object": "model", "created": created, "owned_by": "vllm", "root": model, "parent": None,
        "max_model_len": max_model_len, "permission": [],
    }
    return orjson.dumps({"object": "list", "data": [card]})
