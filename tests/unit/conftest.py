"""Fixtures shared by unit test modules: the edge under uvicorn (test_edge_*), an empty .env (test_deploy_*)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.edgefakes import LIMITS, Edge, edge_server


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    with edge_server(LIMITS) as running:
        yield running


@pytest.fixture
def empty_env_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.env"
    path.write_text("")
    return path
