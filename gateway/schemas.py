"""OpenAI request schemas (plus vLLM's extra parameters) and their validation to 400s."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Required, get_type_hints

import orjson
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before 3.12

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


class StreamOptions(TypedDict, total=False):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    include_usage: bool | None
    continuous_usage_stats: bool | None
    include_obfuscation: bool | None


# The schemas are TypedDicts, not models: validating one checks the keys a request has and builds nothing else,
# where a model with ~80 fields (most of them vLLM's pass-through extras) would fill in every default
# (docs/design/performance.md, "TypedDict schemas").
class SamplingFields(TypedDict, total=False):
    """Fields shared by chat and completions, with the bounds OpenAI and vLLM enforce."""

    model: Required[Annotated[str, Field(min_length=1)]]
    stream: bool
    stream_options: StreamOptions | None
    max_tokens: Annotated[int, Field(ge=1)] | None
    n: Annotated[int, Field(ge=1, le=MAX_N)]
    temperature: Annotated[float, Field(ge=0)] | None
    top_p: Annotated[float, Field(gt=0, le=1)] | None
    top_k: Annotated[int, Field(ge=-1)] | None
    min_p: Annotated[float, Field(ge=0, le=1)] | None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None
    repetition_penalty: Annotated[float, Field(gt=0)] | None
    seed: int | None
    stop: str | list[str] | None
    user: str | None
    logit_bias: dict[str, float] | None
    ignore_eos: bool | None
    min_tokens: Annotated[int, Field(ge=0)] | None
    priority: int | None
    response_format: dict[str, Any] | None


def _messages_have_roles(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for index, message in enumerate(messages):
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}] needs a string 'role'")
    return messages


def _prompt_not_empty(prompt: Any) -> Any:
    if isinstance(prompt, list) and not prompt:
        raise ValueError("prompt must not be an empty list")
    return prompt


class _ChatBase(SamplingFields, total=False):
    messages: Required[Annotated[list[dict[str, Any]], Field(min_length=1), AfterValidator(_messages_have_roles)]]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None
    logprobs: bool | None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None
    tools: list[dict[str, Any]] | None
    tool_choice: str | dict[str, Any] | None
    parallel_tool_calls: bool | None
    reasoning_effort: str | None


class _CompletionBase(SamplingFields, total=False):
    prompt: Required[Annotated[str | list[str] | list[int] | list[list[int]], AfterValidator(_prompt_not_empty)]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None
    suffix: str | None
    prompt_embeds: Any


def _with_extras(base: type[SamplingFields], name: str, extras: tuple[str, ...]) -> TypeAdapter[dict[str, Any]]:
    """A validator for `base` that also lets `extras` through unchecked and refuses any other key."""
    fields = get_type_hints(base, include_extras=True)
    for extra in extras:
        fields.setdefault(extra, Any)
    build: Any = TypedDict  # a schema made at run time, which type checkers cannot follow
    schema = build(name, fields, total=False)
    schema.__pydantic_config__ = ConfigDict(extra="forbid")
    adapter: TypeAdapter[dict[str, Any]] = TypeAdapter(schema)
    return adapter


CHAT_SCHEMA = _with_extras(_ChatBase, "ChatCompletionRequest", VLLM_COMMON_EXTRAS + VLLM_CHAT_EXTRAS + OPENAI_CHAT_ONLY)
COMPLETION_SCHEMA = _with_extras(_CompletionBase, "CompletionRequest", VLLM_COMMON_EXTRAS)

Kind = Literal["chat", "completion"]


class OpenAICall:
    """A validated request: the original JSON object (forwarded as sent) and what routing needs."""

    __slots__ = ("body", "fallbacks", "kind", "model", "session_key", "stream", "wants_continuous_usage",
                 "wants_usage")

    def __init__(
        self, kind: Kind, body: dict[str, Any], checked: dict[str, Any], session_header: str | None = None
    ) -> None:
        self.kind = kind
        self.body = body
        self.model: str = checked["model"]
        self.stream = bool(checked.get("stream"))
        self.session_key: str | None = session_header or checked.get("user")
        options = checked.get("stream_options") or {}
        self.wants_usage = bool(options.get("include_usage"))
        self.wants_continuous_usage = bool(options.get("continuous_usage_stats"))
        self.fallbacks: tuple[str, ...] = ()  # served models to try, in order, when `model` cannot take it

    def retarget(self, model: str) -> None:
        """Send it to another served model (a route's version, a fallback): the body the worker gets names it."""
        self.model = model
        self.body["model"] = model

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


def parse_json_body(raw: bytes, max_depth: int) -> dict[str, Any]:
    """The request's JSON object; a 400 for anything else, or for nesting deeper than `max_depth` (the body is
    written again for the worker, and a serializer's own depth limit must never be what refuses it)."""
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
    if _deeper_than(body, max_depth):
        raise InvalidRequest(f"request body is nested deeper than {max_depth} levels", code="nesting_too_deep")
    return body


def _deeper_than(body: dict[str, Any], max_depth: int) -> bool:
    """Whether containers nest deeper than `max_depth`, the top-level object being level 1: one level at a time,
    so a long flat list (token ids) costs one pass of a comprehension."""
    level: list[Any] = [body]
    for _ in range(max_depth):
        level = [
            child
            for container in level
            for child in (container.values() if type(container) is dict else container)
            if type(child) is dict or type(child) is list
        ]
        if not level:
            return False
    return True


def validate_call(kind: Kind, body: dict[str, Any], session_header: str | None = None) -> OpenAICall:
    schema = CHAT_SCHEMA if kind == "chat" else COMPLETION_SCHEMA
    try:
        checked = schema.validate_python(body)
    except ValidationError as exc:
        raise _as_invalid_request(exc) from None
    return OpenAICall(kind, body, checked, session_header)


def _as_invalid_request(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'", param=param)
    return InvalidRequest(f"Invalid value for '{param}': {first['msg']}", param=param)
