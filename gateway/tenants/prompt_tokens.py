"""The prompt's token count at admission, before any worker has seen it: an estimate, reconciled with the
worker's own count (the final usage) when the request ends (tenants/limiter.py).

Why an estimate: asking a worker's `/tokenize` costs a round trip and a slice of the worker's CPU on every
request, and the count it returns is only needed to decide whether the request fits the key's token window now;
the window is corrected to the exact count afterwards. The estimate counts one token per four bytes of text
(about what BPE tokenizers give for English; fewer bytes per token for code and other scripts, so it errs on the
low side there) plus a few tokens per chat message for the template's role markers; token-id prompts are counted
exactly.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.schemas import OpenAICall

BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def estimate_prompt_tokens(call: OpenAICall) -> int:
    body = call.body
    if call.kind == "completion":
        return max(_prompt_tokens(body.get("prompt")), 1)
    total = 0
    for message in body.get("messages", ()):
        total += TOKENS_PER_MESSAGE + _text_tokens(message.get("content"))
    return max(total, 1)


def _prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, str):
        return _text_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(item, int) for item in prompt):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(_prompt_tokens(item) for item in prompt)
    return 0


def _text_tokens(content: Any) -> int:
    if isinstance(content, str):
        return math.ceil(len(content.encode("utf-8", "replace")) / BYTES_PER_TOKEN)
    if isinstance(content, list):  # content parts: count their text
        return sum(_text_tokens(part.get("text")) for part in content if isinstance(part, dict))
    return 0
