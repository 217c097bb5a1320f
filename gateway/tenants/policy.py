"""What a key allows a request before any limit is counted: the models it may see (a model it may not use is
answered as if it did not exist), the cap on `max_tokens`, and the priority the request runs at.

Priorities: a key's class sets vLLM's per-request `priority` (lower runs first) and its rank in the gateway's own
admission queue (admission/admission.py); the client's own `priority` field passes only when the key allows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from gateway.errors import InvalidRequest, ModelNotFound
from gateway.schemas import OpenAICall
from gateway.tenants.keys_file import Tenant

# vLLM's priority per class (lower is scheduled first) and the gateway queue's rank (lower is admitted first).
VLLM_PRIORITY: Mapping[str, int] = MappingProxyType({"high": -1, "normal": 0, "low": 1})
QUEUE_RANK: Mapping[str, int] = MappingProxyType({"high": 0, "normal": 1, "low": 2})
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def apply_key_policy(tenant: Tenant, call: OpenAICall) -> None:
    """Refuse what the key may not do; cap and set what it may (the body the worker gets is changed here)."""
    if not tenant.allows_model(call.model):
        raise ModelNotFound(f"The model '{call.model}' does not exist", param="model")
    body = call.body
    if tenant.max_tokens is not None:
        for field in TOKEN_FIELDS:
            asked = body.get(field)
            if isinstance(asked, int) and asked > tenant.max_tokens:
                raise InvalidRequest(
                    f"{field} is {asked}, above this key's cap of {tenant.max_tokens}", param=field,
                    code="max_tokens_over_cap",
                )
        if not any(isinstance(body.get(field), int) for field in TOKEN_FIELDS):
            body["max_tokens"] = tenant.max_tokens
    if not (tenant.allow_client_priority and isinstance(body.get("priority"), int)):
        body["priority"] = VLLM_PRIORITY[tenant.priority]


def queue_rank(tenant: Tenant | None) -> int:
    return QUEUE_RANK["normal"] if tenant is None else QUEUE_RANK[tenant.priority]
