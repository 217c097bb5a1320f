"""The real `redis-server` of loadtest/redis_server.py for tests, which skip when it is not installed."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from loadtest import redis_server as server


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server): these tests need one")
    with server.redis_server() as running:
        yield running


@contextlib.contextmanager
def running_redis() -> Iterator[str]:
    with redis_server() as (url, _):
        yield url
