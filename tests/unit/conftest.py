"""Fixtures shared by unit test modules: the edge under uvicorn (test_edge_*), a real redis-server (redis_url)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.edgefakes import LIMITS, Edge, edge_server
from tests.unit.redis_server import running_redis


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    with edge_server(LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A real redis-server for the module's tests (skipped when redis-server is not installed)."""
    with running_redis() as url:
        yield url
