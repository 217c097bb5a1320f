"""The limit store seam: what the gateway asks of whatever keeps its tenants' rate windows, leases and usage.

Contract, identical for every implementation (tests/unit/test_limit_store.py runs the same cases on each):

- `admit` is atomic. It first drops token/request entries that left the sliding window (an entry at time t is in
  the window while now - t < window) and leases whose deadline passed (deadline <= now). It then checks, in this
  order, concurrency, requests, tokens and the daily budget; the first that fails is the refusal's reason and
  nothing is recorded. Admitted, it records a request entry and a token entry (cost = prompt_tokens) at now, adds
  prompt_tokens to the current UTC day's counter, takes a lease until now + lease_s (only when max_concurrent is
  set) and adds the request and its prompt tokens to the usage bucket of the current minute.
- `retry_after_s` is exact: for requests, when the oldest entry that must leave for the count to drop below rpm
  leaves (None when rpm is 0); for tokens, walking entries oldest first until enough cost has left for the prompt
  to fit (None when prompt_tokens > tpm: it never fits); for the daily budget, the next UTC midnight; for
  concurrency, `CONCURRENCY_RETRY_S`, a guess, since leases end when streams end. Negative token counts count as 0.
- `charge` is forced: output tokens already produced count even if they take the window over its limit.
- `reconcile_prompt` replaces the prompt cost recorded at admission (known until max(window, lease_s) after it).
- `release` drops a lease; it is idempotent.
- `refused` counts a refusal in usage; `usage(start, end)` sums the minute buckets overlapping [start, end].
- Any failure of a store's backend surfaces as `StoreUnavailable`, quickly; the caller chooses to fail open or
  closed. `ping` answers False instead of raising.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

WINDOW_S = 60.0  # RPM and TPM are per 60-second sliding window
DAY_S = 86400
MINUTE_S = 60
USAGE_RETENTION_S = 8 * 86400

# A refusal for concurrency cannot know when a stream will end; 1 s is a polite guess at when to try again.
CONCURRENCY_RETRY_S = 1.0


class StoreUnavailable(Exception):
    """The store's backend could not answer (down, refused, timed out, or errored)."""


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One key's limits; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one admission, with what the caller needs for rate-limit headers."""

    admitted: bool
    reason: str | None  # None when admitted, else "requests" | "tokens" | "concurrency" | "daily_tokens"
    retry_after_s: float | None  # refused: seconds until this request would fit (None: never); admitted: 0.0
    requests_remaining: int | None  # after this decision; None when rpm is unlimited
    requests_reset_s: float  # seconds until the request window is back to its full limit (0 when empty)
    tokens_remaining: int | None  # tpm minus tokens in the window (never below 0); None when tpm unlimited
    tokens_reset_s: float  # seconds until the token window is back to its full limit


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Usage of one key over a time range."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    refused: int = 0


class LimitStore(Protocol):
    """Per-key sliding windows, leases, daily budgets and usage; see the module docstring for the contract."""

    async def admit(self, key: str, spec: LimitSpec, request_id: str, prompt_tokens: int, lease_s: float) -> Decision:
        """Admit or refuse one request atomically, recording it when admitted."""
        ...

    async def charge(self, key: str, request_id: str, output_tokens: int) -> None:
        """Count output tokens in the window, the day and usage, even past the limit; n <= 0 does nothing."""
        ...

    async def reconcile_prompt(self, key: str, request_id: str, prompt_tokens: int) -> None:
        """Set the prompt cost recorded at admission to the real count; unknown request_id does nothing."""
        ...

    async def release(self, key: str, request_id: str) -> None:
        """End the request's concurrency lease (idempotent)."""
        ...

    async def finish(self, key: str, request_id: str, prompt_tokens: int | None, output_tokens: int) -> None:
        """A request's end in one call: `release`, then `reconcile_prompt` (unless None), then `charge`."""
        ...

    async def refused(self, key: str) -> None:
        """Count one refused request in usage."""
        ...

    async def usage(self, start: float, end: float) -> dict[str, UsageTotals]:
        """Totals per key over the minute buckets overlapping [start, end] (unix seconds)."""
        ...

    async def ping(self) -> bool:
        """True when the backend answers."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources."""
        ...


def utc_day(now: float) -> int:
    """Days since the epoch; UTC days are exactly 86400 s in unix time (no leap seconds)."""
    return math.floor(now / DAY_S)


def seconds_to_utc_midnight(now: float) -> float:
    return (utc_day(now) + 1) * DAY_S - now


def minute_of(now: float) -> int:
    return math.floor(now / MINUTE_S)


def retention_minutes(retention_s: float) -> int:
    """Buckets kept: minute m survives while m >= current minute - this."""
    return math.ceil(retention_s / MINUTE_S)
