"""Benchmark: mid-stream failover at scale, on fake engines (test doubles of vLLM workers) in numbered mode.

    flock /tmp/specgate-heavy.lock python -m benchmarks.bench_failover --streams 300

Two fake engines whose token i reads " t{i}"; one of them resets a share of its streams (`--reset-share`) after
`--after-events` events. `--streams` concurrent greedy streams of `--tokens` tokens (chat and completions
alternating) go through one gateway, with failover on (the default, one migration per request) and off, in one
run. Reported per set-up: streams whose text is every token once, in order; streams that failed or came out
wrong; the gateway's migrations by outcome.

With `--real`: two real vLLM CPU workers under `specgate up --workers 2` (`--profile`, default cpu-baseline),
`--real-streams` (16) concurrent greedy streams of `--real-tokens` (200) tokens, run undisturbed twice (how often
two undisturbed runs differ: the engine's batch-dependent numerics) and once with one worker SIGKILLed once every
stream has started; reported: client-visible failures and texts that differ from the first undisturbed run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import orjson

from benchmarks.bench_targets import run_process, start_engine
from benchmarks.harness import RESULTS, scrape
from engine.launch import say
from loadtest.fake_numbered import numbered_text
from loadtest.procs import free_port


async def one_stream(client: httpx.AsyncClient, index: int, tokens: int) -> str:
    """'whole', 'wrong' or 'failed' for one stream."""
    chat = index % 2 == 0
    body: dict[str, object] = {"model": "demo", "stream": True, "max_tokens": tokens, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": "count"}]} if chat else {"prompt": "count:"})
    text = ""
    try:
        async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as answer:
            if answer.status_code != 200:
                return "failed"
            async for line in answer.aiter_lines():
                if line.startswith("data: {"):
                    payload = orjson.loads(line[6:])
                    if "error" in payload:
                        return "failed"
                    for choice in payload.get("choices") or []:
                        text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    except httpx.HTTPError:
        return "failed"
    return "whole" if text == numbered_text(0, tokens).decode() else "wrong"


async def drive(url: str, streams: int, tokens: int) -> Counter[str]:
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return Counter(await asyncio.gather(*(one_stream(client, i, tokens) for i in range(streams))))


def migrations(url: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in scrape(url).splitlines():
        if line.startswith("specgate_stream_migrations_total"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            found[outcome] = found.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


REAL_PROMPTS = ["def fibonacci(n):", "The history of the city", "import os\n", "Once upon a time",
                "SELECT name FROM", "The capital of France", "class Node:", "In the beginning"]


async def real_texts(url: str, streams: int, tokens: int, on_started: Callable[[], None] | None) -> list[str | None]:
    """Each stream's text (None: it failed); `on_started` runs once every stream has had its first event."""
    started = asyncio.Event()
    first_events = 0

    async def one(client: httpx.AsyncClient, index: int) -> str | None:
        nonlocal first_events
        body = {"model": "demo", "prompt": REAL_PROMPTS[index % len(REAL_PROMPTS)] + f" #{index}", "stream": True,
                "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        text, counted = "", False
        async with client.stream("POST", "/v1/completions", json=body) as answer:
            if answer.status_code != 200:
                return None
            async for line in answer.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                payload = orjson.loads(line[6:])
                if "error" in payload:
                    return None
                if not counted:
                    counted, first_events = True, first_events + 1
                    if first_events == streams:
                        started.set()
                text += "".join(choice.get("text") or "" for choice in payload.get("choices") or [])
        return text

    async def kill_when_started() -> None:
        await started.wait()
        if on_started is not None:
            on_started()

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        killer = asyncio.create_task(kill_when_started())
        texts = await asyncio.gather(*(one(client, index) for index in range(streams)), return_exceptions=True)
        killer.cancel()
    return [text if isinstance(text, str) else None for text in texts]


def vllm_pids(port: int) -> list[int]:
    import psutil

    return [process.pid for process in psutil.process_iter(["cmdline"])
            if "vllm.entrypoints.openai.api_server" in (process.info["cmdline"] or [])
            and str(port) in (process.info["cmdline"] or [])]


def real_run(args: argparse.Namespace, workdir: Path) -> list[str]:
    gateway_port, worker_port = free_port(), free_port()
    while worker_port + 1 == gateway_port:
        worker_port = free_port()
    argv = [sys.executable, "-m", "gateway.cli", "up", "--profile", args.profile, "--workers", "2", "--port",
            str(gateway_port), "--worker-port", str(worker_port), "--log-dir", str(workdir / "up-logs")]
    url = f"http://127.0.0.1:{gateway_port}"
    with run_process("specgate-up", argv, url + "/ready", None, workdir, timeout_s=900):
        runs: dict[str, list[str | None]] = {}
        killed: list[int] = []
        for label in ("undisturbed", "undisturbed again", "one worker SIGKILLed"):
            kill = None
            if label.startswith("one worker"):
                def kill() -> None:
                    for pid in vllm_pids(worker_port):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            say(f"real engines: {label}")
            runs[label] = asyncio.run(real_texts(url, args.real_streams, args.real_tokens, kill))
        moved = migrations(url)
    reference = runs["undisturbed"]
    lines = ["", f"## Two real vLLM CPU workers ({args.profile}), `specgate up --workers 2`", "",
             f"{args.real_streams} concurrent greedy completions of {args.real_tokens} tokens.", "",
             "| run | failed streams | texts unlike the first undisturbed run |", "|---|---:|---:|"]
    for label, texts in runs.items():
        differ = sum(1 for text, ref in zip(texts, reference, strict=True) if text is not None and text != ref)
        lines.append(f"| {label} | {sum(text is None for text in texts)} | {differ} |")
    lines += ["", f"Killed {len(killed)} vLLM process(es) of one worker as soon as every stream had its first "
              f"token. Gateway migrations: {', '.join(f'{k} {v:g}' for k, v in sorted(moved.items())) or 'none'}."]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--reset-share", type=float, default=0.5)
    parser.add_argument("--after-events", type=int, default=20)
    parser.add_argument("--real", action="store_true", help="also the real-engine run (two vLLM CPU workers)")
    parser.add_argument("--profile", default="cpu-baseline")
    parser.add_argument("--real-streams", type=int, default=16)
    parser.add_argument("--real-tokens", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS / "failover.md")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="specgate-failover-"))
    timing = ["--ttft-ms", "20", "--gap-ms", "10", "--output-len", "1000", "--numbered"]
    faulty = [*timing, "--fault", f"reset={args.reset_share}", "--fault-after-events", str(args.after_events)]
    rows = []
    with start_engine(faulty, "1", workdir) as dying, start_engine(timing, "1", workdir) as healthy:
        for label, max_migrations in (("failover on", "1"), ("failover off", "0")):
            port = free_port()
            argv_gateway = [sys.executable, "-m", "gateway.cli", "gateway", "--workers",
                            f"{dying.url},{healthy.url}", "--port", str(port), "--log-level", "warning"]
            env = {"SPECGATE_REQUEST_LOG": "false", "SPECGATE_MAX_MIGRATIONS": max_migrations,
                   "SPECGATE_WARMUP_TIMEOUT_S": "0", "SPECGATE_ROUTING": "round_robin"}
            url = f"http://127.0.0.1:{port}"
            with run_process(f"gateway-{port}", argv_gateway, url + "/ready", "0", workdir, env):
                say(f"{label}: {args.streams} streams of {args.tokens} tokens")
                outcomes = asyncio.run(drive(url, args.streams, args.tokens))
                rows.append((label, outcomes, migrations(url)))
    lines = ["# Mid-stream failover on fake engines", "",
             f"Command: `{' '.join(['python -m benchmarks.bench_failover', *sys.argv[1:]])}`", "",
             f"Two fake engines (test doubles) in numbered mode, one resetting {args.reset_share:.0%} of its streams "
             f"after {args.after_events} events; {args.streams} concurrent greedy streams of {args.tokens} tokens, "
             "chat and completions alternating, round robin.", "",
             "| set-up | streams whole (every token once, in order) | wrong text | failed | migrations |",
             "|---|---:|---:|---:|---|"]
    for label, outcomes, moved in rows:
        moved_text = ", ".join(f"{k} {v:g}" for k, v in sorted(moved.items())) or "none"
        lines.append(f"| {label} | {outcomes['whole']} | {outcomes['wrong']} | {outcomes['failed']} | {moved_text} |")
    if args.real:
        lines += real_run(args, workdir)
    args.output.write_text("\n".join(lines) + "\n")
    say(f"wrote {args.output}")
    print(args.output.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
