"""Shared pytest configuration: anyio runs async tests on asyncio; no test pays for another's heap."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Once vLLM and torch are imported into this process (~600k objects), one full collection stalls every
    # thread for 0.3-0.5 s: enough to break the load generator's schedule checks or an in-process gateway's
    # timing. What exists before a test starts is moved out of the collector's sight, as the gateway
    # itself does after startup (gateway/server.py).
    gc.freeze()
