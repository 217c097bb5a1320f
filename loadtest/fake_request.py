"""Fake engine input stage: validate an OpenAI request body the way vLLM does and plan the response it gets."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from loadtest.fake_config import FAULT_KINDS, FakeEngineConfig
from loadtest.fake_numbered import continued_from

# Per-message template overhead, roughly what a chat template adds around each turn.
_CHAT_TOKENS_PER_MESSAGE = 4


class BadRequest(Exception):
    """The request is answered with this status and an OpenAI error envelope."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass(slots=True)
class Plan:
    """Everything the engine needs to answer one request."""

    chat: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    ttft_s: float
    gap_s: float
    tokens_per_chunk: int
    # (key, tokens) of each message-boundary prefix of a chat, shortest first, for the prefix-cache counters.
    prefixes: tuple[tuple[int, int], ...] = ()
    fault: str | None = None
    fault_after: int = 0
    request_id: str | None = None
    first_token: int | None = None  # numbered mode: the index of the answer's first token

    def event_sizes(self) -> Iterator[int]:
        """Tokens per event: prefill yields one token, then each decode step yields up to k."""
        remaining = self.output_tokens - 1
        yield 1
        while remaining > 0:
            size = min(self.tokens_per_chunk, remaining)
            remaining -= size
            yield size


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    if content is None:
        return 0
    raise BadRequest(400, "message content must be a string or a list of parts", "messages")


def _chat_size(messages: Any, config: FakeEngineConfig) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(prompt tokens, message-boundary prefixes) of a conversation, the whole prompt last.

    The whole prompt is a prefix of the next turn's prompt: registering it lets a multi-turn chat hit the cache
    for its previous turn, as vLLM's block-wise prefix caching would."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list", "messages")
    chars = 0
    key = 0
    prefixes = []
    for count, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(400, "each message needs a string role", "messages")
        if count > 1:
            prefixes.append((key, math.ceil(chars / config.chars_per_token) + _CHAT_TOKENS_PER_MESSAGE * (count - 1)))
        chars += _content_chars(message.get("content"))
        key = hash((key, orjson.dumps(message)))
    prompt_tokens = math.ceil(chars / config.chars_per_token) + _CHAT_TOKENS_PER_MESSAGE * len(messages)
    prefixes.append((key, prompt_tokens))
    return prompt_tokens, tuple(prefixes)


def _prompt_size(prompt: Any, config: FakeEngineConfig) -> int:
    """Prompt tokens of a completions request; token-id prompts are counted exactly."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return max(1, math.ceil(len(prompt) / config.chars_per_token))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt)
    raise BadRequest(400, "prompt must be one string or one list of token ids (the fake engine serves n=1)", "prompt")


def _positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(400, f"{key} must be a positive integer", key)
    return value


def parse_fault(text: str, default_after: int) -> tuple[str, int]:
    """`kind` or `kind:after_events`, as given in a header or body field."""
    kind, _, after = text.strip().partition(":")
    if kind not in FAULT_KINDS:
        raise BadRequest(400, f"unknown fake fault {kind!r}", "fake_fault")
    try:
        return kind, int(after) if after else default_after
    except ValueError as exc:
        raise BadRequest(400, f"bad fault position in {text!r}", "fake_fault") from exc


def _requested_fault(body: dict[str, Any]) -> str | None:
    xargs = body.get("vllm_xargs")
    fault = body.get("fake_fault") or (xargs.get("fake_fault") if isinstance(xargs, dict) else None)
    return fault if isinstance(fault, str) else None


def plan_request(raw: bytes, *, chat: bool, config: FakeEngineConfig) -> Plan:
    """Validate `raw` and decide prompt size, output length and finish reason; raises BadRequest."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != config.model:
        raise BadRequest(404, f"The model `{model}` does not exist.", "model")
    if body.get("n") not in (None, 1):
        raise BadRequest(400, "the fake engine serves n=1 only", "n")
    stream = body.get("stream", False)
    options = body.get("stream_options")
    if not isinstance(stream, bool) or (options is not None and not isinstance(options, dict)):
        raise BadRequest(400, "stream must be a boolean and stream_options an object", "stream")
    if options and not stream:
        raise BadRequest(400, "Stream options can only be defined when `stream=True`.", "stream_options")
    options = options or {}
    include_usage = bool(options.get("include_usage"))

    prefixes: tuple[tuple[int, int], ...] = ()
    if chat:
        prompt_tokens, prefixes = _chat_size(body.get("messages"), config)
        max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    else:
        prompt_tokens = _prompt_size(body.get("prompt"), config)
        max_tokens = _positive_int(body, "max_tokens")
    if config.prompt_tokens is not None:
        prompt_tokens = config.prompt_tokens
    room = config.max_model_len - prompt_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise BadRequest(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, you requested "
            f"{prompt_tokens + (max_tokens or 1)} tokens ({prompt_tokens} in the messages, {max_tokens or 1} in "
            "the completion). Please reduce the length of the messages or completion.",
        )
    ignore_eos = body.get("ignore_eos", False) is True
    cap = max_tokens if max_tokens is not None else room
    first_token = continued_from(body, chat) if config.numbered else None
    natural = cap + 1 if ignore_eos else max(config.output_len - (first_token or 0), 1)
    output_tokens = min(natural, cap)
    fault = _requested_fault(body)
    plan = Plan(
        chat=chat,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=include_usage and bool(options.get("continuous_usage_stats")),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        finish_reason="stop" if natural <= cap else "length",
        ttft_s=config.ttft_s + prompt_tokens * config.prefill_s_per_token,
        gap_s=config.gap_s,
        tokens_per_chunk=config.tokens_per_chunk,
        prefixes=prefixes if config.prompt_tokens is None else (),
        first_token=first_token,
    )
    if fault is not None:
        plan.fault, plan.fault_after = parse_fault(fault, config.faults.after_events)
    return plan


def apply_headers(plan: Plan, headers: Iterable[tuple[bytes, bytes]], config: FakeEngineConfig) -> None:
    """Per-request overrides (x-fake-*), so one engine can serve a slow or faulty request among normal ones."""
    for name, value in headers:
        if name == b"x-request-id":
            plan.request_id = value.decode("latin-1")
        elif name.startswith(b"x-fake-"):
            text = value.decode("latin-1")
            try:
                if name == b"x-fake-fault":
                    plan.fault, plan.fault_after = parse_fault(text, config.faults.after_events)
                elif name == b"x-fake-ttft-ms":
                    plan.ttft_s = float(text) / 1000.0
                elif name == b"x-fake-gap-ms":
                    plan.gap_s = float(text) / 1000.0
                elif name == b"x-fake-tokens-per-chunk":
                    plan.tokens_per_chunk = max(1, int(text))
            except ValueError as exc:
                raise BadRequest(400, f"bad {name.decode()} header: {text!r}") from exc
