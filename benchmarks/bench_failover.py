"""Benchmark: mid-stream failover at scale, on fake engines (test doubles of vLLM workers) in numbered mode.

    flock /tmp/specgate-heavy.lock python -m benchmarks.bench_failover --streams 300

Two fake engines whose token i reads " t{i}"; one of them resets a share of its streams (`--reset-share`) after
`--after-events` events. `--streams` concurrent greedy streams of `--tokens` tokens (chat and completions
alternating) go through one gateway, with failover on (the default, one migration per request) and off, in one
run. Reported per set-up: streams whose text is every token once, in order; streams that failed or came out
wrong; the gateway's migrations by outcome. The real-engine check (two vLLM workers, one SIGKILLed) is
tests/integration/test_supervised_pool.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--reset-share", type=float, default=0.5)
    parser.add_argument("--after-events", type=int, default=20)
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
    args.output.write_text("\n".join(lines) + "\n")
    say(f"wrote {args.output}")
    print(args.output.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
