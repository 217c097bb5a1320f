"""What a stream has sent its client, kept for comparing answers (shadows) and continuing them (failover): the
bytes as they went out, folded into text once they pass `FOLD_BYTES`, so a long stream holds its text (a few
bytes a token) rather than its events (a hundred and more)."""

from __future__ import annotations

from gateway.streaming.answer_text import sse_text
from gateway.streaming.resume import first_stream_id, has_tool_calls

FOLD_BYTES = 64 * 1024


class SentLog:
    __slots__ = ("_pending", "_pending_size", "_text", "stream_id", "tool_calls")

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._text: list[str] = []
        self.stream_id: str | None = None
        self.tool_calls = False

    def append(self, sent: bytes) -> None:
        """One write to the client (whole events: the relay writes nothing else)."""
        self._pending.append(sent)
        self._pending_size += len(sent)
        if self._pending_size > FOLD_BYTES:
            self._fold()

    def _fold(self) -> None:
        sent = b"".join(self._pending)
        if self.stream_id is None:
            self.stream_id = first_stream_id(sent)
        self.tool_calls = self.tool_calls or has_tool_calls(sent)
        self._text.append(sse_text(sent))
        self._pending, self._pending_size = [], 0

    def text(self) -> str:
        """The answer's text so far (first choice)."""
        self._fold()
        return "".join(self._text)
