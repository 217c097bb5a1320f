"""Per-request speculative decoding, as vLLM reports it in a request's final answer (`metrics.speculative_decoding`,
with `--per-request-spec-decode-metrics summary|detailed`): drafted and accepted tokens and verify steps.

Contract: `take_speculation` reads what is well-formed into the record and ignores anything else; a worker that
sends none, or sends it malformed, leaves the record as it was (the request is then one without speculation).
"""

from __future__ import annotations

from typing import Any

from gateway.observability.record import RequestRecord


def take_speculation(metrics: Any, record: RequestRecord) -> None:
    """Read vLLM's per-request `metrics` object (a chunk's or a whole answer's) into `record`."""
    if not isinstance(metrics, dict):
        return
    spec = metrics.get("speculative_decoding")
    if not isinstance(spec, dict):
        return
    drafted, accepted, steps = (spec.get(key) for key in ("num_draft_tokens", "num_accepted_draft_tokens",
                                                           "num_spec_steps"))
    if not all(type(value) is int and value >= 0 for value in (drafted, accepted, steps)):
        return
    assert isinstance(drafted, int) and isinstance(accepted, int) and isinstance(steps, int)
    if accepted > drafted:
        return
    record.spec_draft_tokens, record.spec_accepted_tokens, record.spec_steps = drafted, accepted, steps
