"""The load generator's loopback guard: loopback targets only unless allowed, refused before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import generator
from loadtest.targets import TargetRefused, resolve_target


@pytest.mark.parametrize("url", ["http://8.8.8.8:8000", "http://10.1.2.3", "http://example.com", "http://0.0.0.0:80"])
def test_loopback_guard_refuses_other_hosts(url: str) -> None:
    with pytest.raises(TargetRefused):
        resolve_target(url, "chat")
    assert resolve_target(url, "completions", allow_remote=True)[0].endswith("/v1/completions")


def test_loopback_guard_accepts_loopback() -> None:
    for url in ("http://127.0.0.1:8000", "http://127.3.4.5", "http://localhost:1/v1", "http://[::1]:9"):
        full, is_chat = resolve_target(url, "chat")
        assert full.endswith("/v1/chat/completions") and "/v1/v1/" not in full and is_chat


def test_cli_refuses_public_target_before_sending(tmp_path: Path) -> None:
    code = generator.main(["--base-url", "http://93.184.216.34:80", "--no-progress", "--output-dir", str(tmp_path)])
    assert code == 2
    assert not (tmp_path / "summary.json").exists()
