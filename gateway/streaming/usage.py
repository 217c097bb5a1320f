"""The usage a stream carries: output tokens per event from the worker's cumulative usage, and only the usage
the client asked for in what it receives (the gateway always asks the worker for usage on every chunk)."""

from __future__ import annotations

from typing import Any

from gateway.observability.record import RequestRecord, token_count
from gateway.observability.speculation import take_speculation
from gateway.upstream.sse import SEPARATOR, Event, UsageTail, encode_data


class UsageFilter:
    """Reads token counts from each event and shows the client only the usage it asked for."""

    __slots__ = ("_continuous", "_include", "_tokens_seen", "exact")

    def __init__(self, include_usage: bool, continuous_usage: bool) -> None:
        self._include = include_usage
        self._continuous = include_usage and continuous_usage
        self._tokens_seen = 0
        self.exact = False

    def tokens_in(self, payload: dict[str, Any], record: RequestRecord, has_content: bool) -> int:
        """Output tokens this event carries, from the worker's cumulative usage when it sends it."""
        usage = payload.get("usage")
        if isinstance(usage, dict):
            completion = token_count(usage.get("completion_tokens"))
            has_choices = bool(payload.get("choices"))
            if not has_choices:  # the final usage chunk: vLLM's per-request report rides on it
                take_speculation(payload.get("metrics"), record)
            return self._counted(usage, completion, record, has_choices)
        if has_content and not self.exact:
            # A worker without per-chunk usage: one token per content event is the best estimate.
            self._tokens_seen += 1
            record.output_tokens = max(record.output_tokens, self._tokens_seen)
            return 1
        return 0

    def take_tail(self, tail: UsageTail, record: RequestRecord) -> tuple[bytes, int] | None:
        """A content chunk read from its usage (`upstream.sse.usage_tail`): the bytes the client gets and the new
        tokens it carries; None, with nothing counted, if it carries no new token (the whole parse then takes it,
        as it takes every event that is not plainly one more token or more)."""
        raw, at, usage = tail
        completion = token_count(usage.get("completion_tokens"))
        if completion <= self._tokens_seen:
            return None
        tokens = self._counted(usage, completion, record, True)
        # Without its usage member: the bytes up to it, and the top-level object's closing brace.
        return (raw + SEPARATOR if self._continuous else raw[:at] + b"}" + SEPARATOR), tokens

    def _counted(self, usage: dict[str, Any], completion: int, record: RequestRecord, has_choices: bool) -> int:
        """Take an event's cumulative usage into the record; the new output tokens it carries (none for the
        usage-only chunk, which has no choices)."""
        record.prompt_tokens = token_count(usage.get("prompt_tokens")) or record.prompt_tokens
        record.output_tokens = completion
        if not has_choices:
            return 0
        self.exact = True
        delta = completion - self._tokens_seen
        self._tokens_seen = completion
        return max(delta, 0)

    def client_bytes(self, event: Event) -> bytes | None:
        """The bytes to send for this event, or None to hold it back (usage the client did not ask for)."""
        payload = event.payload
        if payload is None or "usage" not in payload:
            return event.raw + SEPARATOR
        if not payload.get("choices"):
            return event.raw + SEPARATOR if self._include else None
        if self._continuous:
            return event.raw + SEPARATOR
        trimmed = dict(payload)
        del trimmed["usage"]
        return encode_data(trimmed)
