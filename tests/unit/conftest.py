"""Fixtures shared by unit test modules: the edge under uvicorn (test_edge_*)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.edgefakes import LIMITS, Edge, edge_server


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    with edge_server(LIMITS) as running:
        yield running
