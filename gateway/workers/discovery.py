"""Turns configured worker entries into base URLs, resolving DNS names to every address."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

DNS_SCHEME = "dns+"


def is_dynamic(entry: str) -> bool:
    """`dns+http://name:port` means every address the name resolves to (a headless Service, replicas)."""
    return entry.startswith(DNS_SCHEME)


async def resolve(entries: Sequence[str]) -> list[str]:
    """Static URLs as they are; DNS entries as one URL per resolved address. Sorted, without repeats."""
    urls: set[str] = set()
    loop = asyncio.get_running_loop()
    for entry in entries:
        if not is_dynamic(entry):
            urls.add(entry)
            continue
        parts = urlsplit(entry[len(DNS_SCHEME) :])
        if parts.hostname is None:
            raise ValueError(f"worker entry without a host name: {entry}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            continue  # a name with no addresses yet (pods not scheduled) is an empty set, not an error
        for family, _, _, _, address in infos:
            host = f"[{address[0]}]" if family == socket.AF_INET6 else str(address[0])
            urls.add(f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}")
    return sorted(urls)
