"""The text of an answer from its SSE events (chat deltas or completion text, first choice), for comparing two
answers by hash (shadow traffic) without keeping them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from gateway.upstream.sse import Event, EventSplitter


def payload_text(payload: dict[str, Any] | None) -> str:
    if not payload:
        return ""
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def whole_answer_text(answer: dict[str, Any]) -> str:
    """The text of a whole (non-streaming) answer: its first choice's message content, or text."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    message = choices[0].get("message")
    text = message.get("content") if isinstance(message, dict) else choices[0].get("text")
    return text if isinstance(text, str) else ""


def events_text(events: Iterable[Event]) -> str:
    return "".join(payload_text(event.payload) for event in events)


def sse_text(body: bytes) -> str:
    """The answer's text from the bytes of a whole stream."""
    splitter = EventSplitter()
    return events_text(Event.parse(raw) for raw in splitter.feed(body + b"\n\n"))


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
