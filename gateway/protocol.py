"""Parse stage: OpenAI request schemas (plus vLLM's extra parameters) and their validation to 400s."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import InvalidRequest

MAX_N = 128
MAX_LOGPROBS = 20

# Fields vLLM accepts beyond OpenAI's; they pass through untouched (vLLM 0.32 protocol).
VLLM_COMMON_EXTRAS = (
    "add_special_tokens", "allowed_token_ids", "bad_words", "cache_salt", "ec_transfer_params",
    "echo", "ignore_eos", "include_stop_str_in_output", "kv_transfer_params", "length_penalty",
    "logprob_token_ids", "min_p", "min_tokens", "mm_payload", "priority", "prompt_logprobs",
    "repetition_detection", "repetition_penalty", "request_id", "return_mm_kwargs",
    "return_token_ids", "return_token_offsets", "return_tokens_as_token_ids",
    "routed_experts_prompt_start", "session_id", "skip_special_tokens",
    "spaces_between_special_tokens", "stop_token_ids", "stream_interval", "structured_outputs",
    "thinking_token_budget", "top_k", "truncate_prompt_tokens", "truncation_side",
    "use_beam_search", "vllm_xargs", "watermarking",
    # Older vLLM names still sent by clients.
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "best_of",
)
VLLM_CHAT_EXTRAS = (
    "add_generation_prompt", "chat_template", "chat_template_kwargs", "continue_final_message",
    "documents", "include_reasoning", "media_io_kwargs", "mm_processor_kwargs", "return_prompt_text",
)
# OpenAI fields vLLM ignores; accepted so official clients never get a 400 for them.
OPENAI_CHAT_ONLY = (
    "audio", "function_call", "functions", "metadata", "modalities", "prediction",
    "prompt_cache_key", "safety_identifier", "service_tier", "store", "verbosity", "web_search_options",
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None
    include_obfuscation: bool | None = None


class SamplingFields(BaseModel):
    """Fields shared by chat and completions, with the bounds OpenAI and vLLM enforce."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0)
    priority: int | None = None
    response_format: dict[str, Any] | None = None


def _allow(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: (Any, None) for name in names}


class _ChatBase(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None

    @field_validator("messages")
    @classmethod
    def _messages_have_roles(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, message in enumerate(messages):
            if not isinstance(message.get("role"), str):
                raise ValueError(f"messages[{index}] needs a string 'role'")
        return messages


class _CompletionBase(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    prompt_embeds: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        return prompt


def _with_extras(base: type[SamplingFields], name: str, extras: tuple[str, ...]) -> type[SamplingFields]:
    fields = {key: value for key, value in _allow(extras).items() if key not in base.model_fields}
    namespace: dict[str, Any] = {"__annotations__": {k: v[0] for k, v in fields.items()}}
    namespace.update({k: v[1] for k, v in fields.items()})
    namespace["__module__"] = __name__
    return type(name, (base,), namespace)


ChatCompletionRequest = _with_extras(
    _ChatBase, "ChatCompletionRequest", VLLM_COMMON_EXTRAS + VLLM_CHAT_EXTRAS + OPENAI_CHAT_ONLY
)
CompletionRequest = _with_extras(_CompletionBase, "CompletionRequest", VLLM_COMMON_EXTRAS)

Kind = Literal["chat", "completion"]


class OpenAICall:
    """A validated request: the original JSON object (forwarded as sent) and what routing needs."""

    __slots__ = ("body", "kind", "model", "session_key", "stream", "wants_continuous_usage", "wants_usage")

    def __init__(
        self, kind: Kind, body: dict[str, Any], parsed: SamplingFields, session_header: str | None = None
    ) -> None:
        self.kind = kind
        self.body = body
        self.model = parsed.model
        self.stream = parsed.stream
        self.session_key = session_header or parsed.user
        options = parsed.stream_options
        self.wants_usage = bool(options and options.include_usage)
        self.wants_continuous_usage = bool(options and options.continuous_usage_stats)

    def prefix_text(self) -> str:
        """The prompt as one string, in order, for prefix-aware routing (not sent anywhere)."""
        if self.kind == "completion":
            prompt = self.body.get("prompt")
            return prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()
        parts = []
        for message in self.body.get("messages", ()):
            content = message.get("content")
            text = content if isinstance(content, str) else orjson.dumps(content).decode()
            parts.append(f"\x1e{message.get('role')}\x1f{text}")
        return "".join(parts)

    def upstream_body(self) -> bytes:
        """The client's body; streams also ask the worker for per-chunk usage so token counts are exact."""
        if not self.stream:
            return orjson.dumps(self.body)
        body = dict(self.body)
        body["stream_options"] = {
            **(self.body.get("stream_options") or {}),
            "include_usage": True,
            "continuous_usage_stats": True,
        }
        return orjson.dumps(body)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def validate_call(kind: Kind, body: dict[str, Any], session_header: str | None = None) -> OpenAICall:
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        parsed = schema.model_validate(body)
    except ValidationError as exc:
        raise _as_invalid_request(exc) from None
    return OpenAICall(kind, body, parsed, session_header)


def _as_invalid_request(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'", param=param)
    return InvalidRequest(f"Invalid value for '{param}': {first['msg']}", param=param)
