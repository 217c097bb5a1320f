"""OpenAI's rate-limit headers for one decision: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, and
`retry-after` / `retry-after-ms` on a refusal (the official clients wait what `retry-after-ms` says, else
`retry-after`, before retrying).

A reset is OpenAI's: the time until that window is back to its full limit, written as OpenAI writes durations
("20ms", "1.5s", "6m0s"). Unlimited windows send no headers for that window.
"""

from __future__ import annotations

import math

from gateway.tenants.store.base import Decision, LimitSpec


def duration(seconds: float) -> str:
    """OpenAI's duration text: milliseconds under a second, seconds under a minute, then minutes and seconds."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def rate_limit_headers(spec: LimitSpec, decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    if spec.rpm is not None and decision.requests_remaining is not None:
        headers["x-ratelimit-limit-requests"] = str(spec.rpm)
        headers["x-ratelimit-remaining-requests"] = str(decision.requests_remaining)
        headers["x-ratelimit-reset-requests"] = duration(decision.requests_reset_s)
    if spec.tpm is not None and decision.tokens_remaining is not None:
        headers["x-ratelimit-limit-tokens"] = str(spec.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(decision.tokens_remaining)
        headers["x-ratelimit-reset-tokens"] = duration(decision.tokens_reset_s)
    return headers


def retry_headers(retry_after_s: float) -> tuple[int, dict[str, str]]:
    """Whole seconds for `retry-after` (rounded up: a client that waits them finds room) and the exact wait in
    `retry-after-ms`."""
    return max(math.ceil(retry_after_s), 1), {"retry-after-ms": str(max(math.ceil(retry_after_s * 1000), 1))}
