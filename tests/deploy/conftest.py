"""Fixtures of the deployment checks: an empty .env for Compose."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def empty_env_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.env"
    path.write_text("")
    return path
