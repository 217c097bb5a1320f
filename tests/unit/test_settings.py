"""Settings precedence: CLI > environment > YAML > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import load_settings


def test_defaults_serve_on_loopback_8000(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECGATE_PORT", raising=False)
    settings = load_settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


def test_cli_beats_env_beats_yaml_beats_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("port: 9001\nrouting: round_robin\nmax_queue: 7\nworkers: [http://yaml:1]\n")
    monkeypatch.setenv("SPECGATE_PORT", "9002")
    monkeypatch.setenv("SPECGATE_WORKERS", "http://env-a:1/, http://env-b:2")
    from_yaml_and_env = load_settings(config)
    assert from_yaml_and_env.port == 9002
    assert from_yaml_and_env.routing == "round_robin"
    assert from_yaml_and_env.max_queue == 7
    assert from_yaml_and_env.workers == ["http://env-a:1", "http://env-b:2"]
    from_cli = load_settings(config, port=9003, workers="http://cli:3", routing=None)
    assert from_cli.port == 9003
    assert from_cli.workers == ["http://cli:3"]
    assert from_cli.routing == "round_robin"


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "absent.yaml")


def test_shipped_gateway_yaml_loads() -> None:
    settings = load_settings(Path(__file__).parents[2] / "configs" / "gateway.yaml")
    assert settings.routing == "least_loaded"
