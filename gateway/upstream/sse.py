"""Splits an upstream SSE byte stream into whole events and reads what they carry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

SEPARATOR = b"\n\n"
DONE_PAYLOAD = b"[DONE]"
USAGE_MEMBER = b',"usage":{'
# A content chunk read from its usage alone: the event's bytes, where its usage member starts, the usage.
UsageTail = tuple[bytes, int, dict[str, Any]]


class EventSplitter:
    """Incremental splitter: feed it network chunks, get back whole events (without the separator)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        last = len(chunk) - 2
        if not self._buffer and last > 0 and chunk.find(SEPARATOR) == last and b"\r" not in chunk:
            return [chunk[:last]]  # the usual read: exactly one whole event
        return self._feed(chunk)

    def _feed(self, chunk: bytes) -> list[bytes]:
        if b"\r" in chunk:
            # Both separators are legal SSE; vLLM sends \n, some servers \r\n.
            chunk = chunk.replace(b"\r\n", b"\n")
        buffer = self._buffer + chunk if self._buffer else chunk
        if SEPARATOR not in buffer:
            self._buffer = buffer
            return []
        parts = buffer.split(SEPARATOR)
        self._buffer = parts.pop()
        return [part for part in parts if part]

    def clear(self) -> None:
        """Forget a partial event (to feed the same bytes again)."""
        self._buffer = b""

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not been terminated yet."""
        return self._buffer


@dataclass(slots=True)
class Event:
    """One upstream SSE event; `payload` is the parsed JSON of its data lines, if any."""

    raw: bytes
    payload: dict[str, Any] | None = None
    is_done: bool = False
    is_comment: bool = False
    is_error: bool = False
    has_content: bool = False  # a choice carries generated text, reasoning or a tool call

    @classmethod
    def parse(cls, raw: bytes) -> Event:
        if raw.startswith(b":"):
            return cls(raw, is_comment=True)
        data = _data_of(raw)
        if data == DONE_PAYLOAD:
            return cls(raw, is_done=True)
        if not data:
            return cls(raw)
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return cls(raw)
        if not isinstance(payload, dict):
            return cls(raw)
        return cls(raw, payload, is_error="error" in payload, has_content=_has_content(payload))


def _has_content(payload: dict[str, Any]) -> bool:
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return False  # not vLLM's shape: relayed as it is, carrying nothing countable
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
        ):
            return True
    return False


def _data_of(raw: bytes) -> bytes:
    if raw.startswith(b"data: "):
        if b"\n" not in raw:
            return raw[6:]
    elif raw.startswith(b"data:") and b"\n" not in raw:
        return raw[5:].lstrip(b" ")
    # Multi-line events join their data lines with newlines (SSE spec).
    lines = [line for line in raw.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(line[5:].removeprefix(b" ") for line in lines)


def usage_tail(raw: bytes) -> UsageTail | None:
    """A vLLM content chunk read from its trailing usage member alone; None for any other event.

    The chunk is `data: {...,"choices":[{...}],"usage":{...}}` (per-chunk usage); any other event is left to
    `Event.parse`, which reads it whole. Reading the usage member alone spares a whole parse of every content
    chunk and its re-encoding without its usage (docs/design/performance.md, "Usage member cut by bytes").
    The byte checks are exact for valid JSON: a quote inside a JSON string is escaped, so `,"usage":{` and
    `"choices":[{` can only be members, and a usage that parses and runs to the last byte but one is the last
    member of the top-level object. An event that mentions "error" anywhere is left to the whole parse.
    """
    if not raw.startswith(b"data: {") or not raw.endswith(b"}}") or b"\n" in raw:
        return None
    if b'"choices":[{' not in raw or b'"error"' in raw:
        return None
    at = raw.rfind(USAGE_MEMBER)
    if at < 0:
        return None
    try:
        usage = orjson.loads(raw[at + len(USAGE_MEMBER) - 1 : -1])  # from the usage object's brace
    except orjson.JSONDecodeError:
        return None
    return (raw, at, usage) if isinstance(usage, dict) else None


def encode_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + SEPARATOR
