"""Load generator target: resolve the endpoint URL and refuse anything but loopback unless told otherwise."""

from __future__ import annotations

import ipaddress
from types import MappingProxyType
from urllib.parse import urlsplit

ENDPOINTS = MappingProxyType({"chat": "/v1/chat/completions", "completions": "/v1/completions"})


class TargetRefused(ValueError):
    """The target is not a loopback address and remote targets were not allowed."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or the name localhost; other names are not resolved (DNS may point anywhere)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_target(base_url: str, endpoint: str, *, allow_remote: bool = False) -> tuple[str, bool]:
    """(full endpoint URL, is it chat) for `endpoint` = chat | completions | a path; raises TargetRefused."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base URL must look like http://127.0.0.1:8000, got {base_url!r}")
    if not allow_remote and not is_loopback(parts.hostname):
        raise TargetRefused(
            f"refusing to load-test non-loopback host {parts.hostname!r}; pass --allow-remote if you own it"
        )
    path = ENDPOINTS.get(endpoint, endpoint)
    if not path.startswith("/"):
        raise ValueError(f"endpoint must be chat, completions or a path, got {endpoint!r}")
    root = base_url.rstrip("/")
    if root.endswith("/v1") and path.startswith("/v1/"):
        root = root[: -len("/v1")]  # accept the OpenAI-client style base URL ending in /v1
    return root + path, path.endswith("chat/completions")
