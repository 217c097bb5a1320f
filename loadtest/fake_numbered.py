"""The fake engine's numbered mode (a test double's, for checking mid-stream failover): token i of an answer reads
" t{i}", and a request that continues an answer (a chat's final assistant message with `continue_final_message`,
or a completion prompt ending in numbered tokens) goes on from the number after the last one in it. A client can
then check that a stream spliced from two workers holds every token once, in order."""

from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(r" t(\d+)")


def continued_from(body: dict[str, Any], chat: bool) -> int:
    """How many numbered tokens the request's text already holds: the index its answer starts at."""
    if chat:
        messages = body.get("messages")
        if not (body.get("continue_final_message") and isinstance(messages, list) and messages):
            return 0
        last = messages[-1]
        text = last.get("content") if isinstance(last, dict) and last.get("role") == "assistant" else None
    else:
        text = body.get("prompt")
    if not isinstance(text, str):
        return 0
    found = _TOKEN.findall(text)
    return int(found[-1]) + 1 if found else 0


def numbered_text(first: int, count: int) -> bytes:
    return "".join(f" t{index}" for index in range(first, first + count)).encode()
