"""Benchmark of HTTP clients for the load generator: client CPU per SSE event, aiohttp vs httpx vs the load
generator's own (loadtest/wire_client.py), same fake engine.

    .venv/bin/python -m loadtest.bench_clients --streams 100 --tokens 200 --gap-ms 5

The fake engine runs pinned to --engine-cpu; each client reads the same streams in its own process pinned to
--client-cpu and only counts events, so the figure is the client library's own cost per event.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

import orjson

from loadtest.bench_procs import free_port, pinned, wait_healthy

CLIENTS = ("aiohttp", "httpx", "wire")


async def _aiohttp(url: str, body: bytes, streams: int) -> int:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> int:
            events = 0
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                async for data in response.content.iter_any():
                    events += data.count(b"\n\n")
            return events

        return sum(await asyncio.gather(*(one() for _ in range(streams))))


async def _httpx(url: str, body: bytes, streams: int) -> int:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def one() -> int:
            events = 0
            async with client.stream("POST", url, content=body,
                                     headers={"content-type": "application/json"}) as response:
                async for data in response.aiter_raw():
                    events += data.count(b"\n\n")
            return events

        return sum(await asyncio.gather(*(one() for _ in range(streams))))


async def _wire(url: str, body: bytes, streams: int) -> int:
    from loadtest.wire_client import StreamClient

    client = StreamClient(url)
    try:
        async def one() -> int:
            events = 0

            def take(data: bytes) -> bool:
                nonlocal events
                events += data.count(b"\n\n")
                return True

            await client.post(body, take)
            return events

        return sum(await asyncio.gather(*(one() for _ in range(streams))))
    finally:
        await client.aclose()


READERS = {"aiohttp": _aiohttp, "httpx": _httpx, "wire": _wire}


def run_client(name: str, url: str, streams: int, tokens: int) -> None:
    """Child process: one warm-up pass, then a measured pass; prints one JSON line."""
    import uvloop

    body = orjson.dumps({"model": "demo", "prompt": "hi", "max_tokens": tokens, "ignore_eos": True, "stream": True,
                         "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    read = READERS[name]
    uvloop.run(read(url, body, streams))
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    events = uvloop.run(read(url, body, streams))
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(orjson.dumps({"client": name, "events": events, "wall_s": wall, "cpu_s": cpu,
                        "cpu_us_per_event": cpu / events * 1e6, "events_per_s": events / wall}).decode())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_clients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--engine-cpu", default="0")
    parser.add_argument("--client-cpu", default="1")
    parser.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_client(args.child, args.url, args.streams, args.tokens)
        return 0
    port = free_port()
    engine = subprocess.Popen(pinned(args.engine_cpu, [
        sys.executable, "-m", "loadtest.fake_engine", "--port", str(port), "--ttft-ms", "1",
        "--gap-ms", str(args.gap_ms)]))
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        print(f"{args.streams} streams x {args.tokens} events, gap {args.gap_ms:g} ms\n")
        print("| client | events | wall s | client CPU s | CPU µs/event | events/s |\n|---|---|---|---|---|---|")
        for name in CLIENTS:
            child = [sys.executable, "-m", "loadtest.bench_clients", "--child", name, "--streams", str(args.streams),
                     "--tokens", str(args.tokens), "--url", f"http://127.0.0.1:{port}/v1/completions"]
            line = subprocess.run(pinned(args.client_cpu, child), check=True, capture_output=True, text=True).stdout
            result = orjson.loads(line.strip().splitlines()[-1])
            print(f"| {name} | {result['events']} | {result['wall_s']:.2f} | {result['cpu_s']:.2f} | "
                  f"{result['cpu_us_per_event']:.1f} | {result['events_per_s']:,.0f} |")
    finally:
        engine.terminate()
        engine.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
