"""Peer gateways for the side-by-side benchmark: LiteLLM proxy and vllm-router, each in its own venv.

    python -m benchmarks.peers install            # (re)create both venvs under .cache/peers/
    python -m benchmarks.peers install litellm    # just one
    python -m benchmarks.peers check              # which peers are ready

The venvs live in `.cache/peers/<name>/` (git-ignored), so the peers' many dependencies never touch the
project's own venv. A peer whose venv is missing is skipped by the benchmark, with a note in its report.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import venv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent.parent / ".cache" / "peers"
NAMES = ("litellm", "vllm-router")


@dataclass(frozen=True)
class Launch:
    """How to start a peer: its command, extra environment, and the path that answers 200 once it is up."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"


@dataclass(frozen=True)
class Peer:
    name: str
    requirement: str  # what `pip install` gets
    executable: str  # console script inside the venv's bin/

    def venv_dir(self, root: Path = PEERS_DIR) -> Path:
        return root / self.name

    def binary(self, root: Path = PEERS_DIR) -> Path:
        return self.venv_dir(root) / "bin" / self.executable

    def available(self, root: Path = PEERS_DIR) -> bool:
        return self.binary(root).is_file()

    def version(self, root: Path = PEERS_DIR) -> str:
        package = self.requirement.split("[")[0]
        pip = self.venv_dir(root) / "bin" / "pip"
        if not pip.is_file():
            return "not installed"
        shown = subprocess.run([str(pip), "show", package], capture_output=True, text=True, check=False).stdout
        return next((line.split(":", 1)[1].strip() for line in shown.splitlines() if line.startswith("Version:")),
                    "unknown")


def peer(name: str) -> Peer:
    if name == "litellm":
        return Peer("litellm", "litellm[proxy]", "litellm")
    if name == "vllm-router":
        # The Rust router, shipped as a wheel with a compiled extension; `vllm-router` is its launcher.
        return Peer("vllm-router", "vllm-router", "vllm-router")
    raise ValueError(f"unknown peer {name!r}; expected one of {', '.join(NAMES)}")


def install(name: str, root: Path = PEERS_DIR, *, fresh: bool = False) -> Path:
    """Create the peer's venv (from scratch with `fresh`) and pip-install it; returns the venv path."""
    spec = peer(name)
    target = spec.venv_dir(root)
    if fresh and target.exists():
        shutil.rmtree(target)
    if not (target / "bin" / "python").exists():
        venv.EnvBuilder(with_pip=True, clear=False).create(target)
    subprocess.run([str(target / "bin" / "pip"), "install", "--quiet", "--upgrade", spec.requirement], check=True)
    return target


def litellm_config(upstream: str, model: str = "demo") -> str:
    """A minimal proxy config: one model on the upstream's OpenAI API, no DB, no callbacks, no telemetry."""
    return (
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: hosted_vllm/{model}\n"
        f"      api_base: {upstream.rstrip('/')}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
        "  turn_off_message_logging: true\n"
        "  callbacks: []\n"
        "  success_callback: []\n"
        "  failure_callback: []\n"
        "general_settings:\n"
        "  disable_spend_logs: true\n"
        "  disable_error_logs: true\n"
        "  disable_adding_master_key_hash_to_db: true\n"
        "  background_health_checks: false\n"
    )


def litellm_launch(port: int, upstream: str, workdir: Path, root: Path = PEERS_DIR) -> Launch:
    config = workdir / f"litellm-{port}.yaml"
    config.write_text(litellm_config(upstream))
    argv = [str(peer("litellm").binary(root)), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]
    env = {
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
        # The model cost map is otherwise fetched from the internet at start-up.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "DISABLE_SCHEMA_UPDATE": "true",
        "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
        "STORE_MODEL_IN_DB": "False",
        # No auth anywhere in the comparison (specgate runs without API keys too); loopback only.
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
        # Its guard against a looping model fails a stream after 100 identical chunks; the fake engine's tokens
        # are all " tok" by design.
        "REPEATED_STREAMING_CHUNK_LIMIT": "1000000000",
    }
    return Launch(argv, env, health_path="/health/liveliness")


def vllm_router_launch(port: int, upstream: str, metrics_port: int, root: Path = PEERS_DIR) -> Launch:
    argv = [str(peer("vllm-router").binary(root)), "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", upstream.rstrip("/"), "--policy", "round_robin",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            "--worker-startup-check-interval", "1", "--log-level", "warning",
            # Its default admission (100 queued, then 429s) would turn a load test into a rejection test.
            "--max-concurrent-requests", "32768", "--queue-size", "4096"]
    return Launch(argv, {}, health_path="/health")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("install", "check"))
    parser.add_argument("names", nargs="*", default=list(NAMES))
    parser.add_argument("--fresh", action="store_true", help="delete the venv first")
    parser.add_argument("--root", type=Path, default=PEERS_DIR)
    args = parser.parse_args(argv)
    status = 0
    for name in args.names:
        spec = peer(name)
        if args.action == "install":
            print(f"installing {spec.requirement} into {spec.venv_dir(args.root)}", file=sys.stderr, flush=True)
            try:
                install(name, args.root, fresh=args.fresh)
            except subprocess.CalledProcessError as exc:
                print(f"{name}: install failed ({exc})", file=sys.stderr)
                status = 1
                continue
        ready = spec.available(args.root)
        print(f"{name}: {'ready' if ready else 'missing'} {spec.version(args.root) if ready else ''}".rstrip())
        status |= 0 if ready else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
