"""The processes under test: a fresh fake engine and a fresh gateway in front of it, each pinned to its core and
started through the `specgate` CLI, and the settings that gateway runs with."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_targets import Target, engine_timing_args, run_process
from gateway.settings import GatewaySettings
from loadtest.procs import free_port

ENV_PREFIX = GatewaySettings.model_config.get("env_prefix", "SPECGATE_")


def specgate_cli() -> str:
    """The `specgate` console script of this interpreter's venv (the CLI users run), else the one on PATH."""
    beside = Path(sys.executable).parent / "specgate"
    found = str(beside) if beside.exists() else shutil.which("specgate")
    if found is None:
        raise SystemExit("no `specgate` console script beside this interpreter or on PATH (make install)")
    return found


def token_text(size: int) -> str:
    """The fake engine's per-token text, `size` characters: with 1 token per event, an event is ~size+200 bytes."""
    return (" tok" * (size // 4 + 1))[:size]


def engine_argv(args: argparse.Namespace, port: int) -> list[str]:
    return [specgate_cli(), "fake-engine", "--port", str(port),
            *engine_timing_args(args.ttft_ms, args.gap_ms, args.output_len),
            "--max-running", "10000", "--max-model-len", str(args.output_len + 1024),
            "--token-text", token_text(args.token_chars), "--log-level", "warning"]


def gateway_env(args: argparse.Namespace) -> dict[str, str]:
    """The SPECGATE_* variables the benchmark sets for the gateway (over whatever this environment has)."""
    return {"SPECGATE_SSE_SEND_TIMEOUT_S": f"{args.send_timeout_s:g}", "SPECGATE_REQUEST_LOG": "false",
            "SPECGATE_MAX_CONCURRENCY": str(max(4096, 4 * args.streams))}


def inherited_env() -> list[str]:
    """Names of SPECGATE_* variables the gateway inherits from this environment (values left out: some are keys)."""
    return sorted(name for name in os.environ if name.startswith(ENV_PREFIX))


def gateway_settings(args: argparse.Namespace) -> GatewaySettings:
    """The settings the gateway reads: its defaults, this environment's SPECGATE_* and the benchmark's own on top
    (the gateway is started with no config file; its CLI flags here set only workers, port and log level)."""
    # Strings, validated as the environment's are; given as arguments, they win over the environment's.
    passed: dict[str, Any] = {name.removeprefix(ENV_PREFIX).lower(): value for name, value in gateway_env(args).items()}
    return GatewaySettings(**passed)


@dataclass(frozen=True)
class Stack:
    engine: Target
    gateway: Target
    gateway_port: int
    engine_port: int


@contextlib.contextmanager
def start_stack(args: argparse.Namespace, log_dir: Path, phase: str) -> Iterator[Stack]:
    """A fresh fake engine and a fresh gateway in front of it, each pinned to its core."""
    engine_port, gateway_port = free_port(), free_port()
    engine_url, gateway_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
    client_cpu, gateway_cpu = args.client_cpu or None, args.gateway_cpu or None
    gateway_argv = [specgate_cli(), "gateway", "--workers", engine_url, "--port", str(gateway_port),
                    "--log-level", "warning"]
    with (run_process(f"{phase}-engine-{engine_port}", engine_argv(args, engine_port), engine_url + "/health",
                      client_cpu, log_dir) as engine_pid,
          run_process(f"{phase}-gateway-{gateway_port}", gateway_argv, gateway_url + "/ready", gateway_cpu, log_dir,
                      gateway_env(args)) as gateway_pid):
        yield Stack(Target("engine", engine_url, engine_pid), Target("specgate", gateway_url, gateway_pid),
                    gateway_port, engine_port)
