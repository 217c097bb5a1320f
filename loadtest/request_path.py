"""Where a lone streaming request's time goes inside the gateway, stage by stage (the 1-stream TTFT overhead).

    python -m loadtest.request_path --requests 40

Starts the fake engine (--client-cpu) and `specgate gateway` (--gateway-cpu) with timestamps taken at each
stage of a request's way through it: uvicorn reading and parsing it, the app and middleware, the handler,
validation, admission and routing, building and writing the worker request, the worker's headers, its
first event (in the worker connection's read callback) and the head written with it from there. Requests
are sent one at a time, as at concurrency 1, and the table gives each stage's median. A measurement aid:
the wrappers add a few µs per stage, and one process at idle runs colder (slower per step) than the same
code under load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from loadtest.bench_measure import say
from loadtest.bench_procs import pin_self
from loadtest.bench_targets import engine_timing_args, start_engine, start_instrumented_gateway

STAGES = (
    ("recv", "uvicorn reads the request"),
    ("parsed", "uvicorn has parsed it (scope built, app task created)"),
    ("app", "the app is called"),
    ("handler", "middleware, routing: the handler starts"),
    ("validated", "body read, JSON parsed, schema validated"),
    ("open", "relay and response built; watch, admission, routing to a worker"),
    ("send", "the worker call starts"),
    ("written", "the worker request built and written"),
    ("headers", "the worker's response headers arrive"),
    ("first_read", "its first event arrives (engine TTFT), in the worker connection's read callback"),
    ("first_body", "the head and the first events framed and written from there, in one write"),
)


class Marks:
    """Stage timestamps of the gateway process, written as one JSON line per request at its first body."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.current: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        self.current.setdefault(stage, time.perf_counter())

    def start(self) -> None:
        self.current = {"recv": time.perf_counter()}

    def flush(self) -> None:
        with self.out.open("ab") as sink:
            sink.write(orjson.dumps(self.current) + b"\n")


def instrument(marks: Marks) -> None:
    """Wrap the stages' functions (looked up at call time by their callers) with timestamps."""
    from uvicorn.protocols.http import httptools_impl

    from gateway import api, app, relay, upstream, workerconnection, workerwire

    protocol = httptools_impl.HttpToolsProtocol
    data_received, message_complete = protocol.data_received, protocol.on_message_complete

    def on_data(self: Any, data: bytes) -> None:
        if data.startswith(b"POST"):
            marks.start()
        data_received(self, data)

    def on_complete(self: Any) -> None:
        marks.mark("parsed")
        message_complete(self)

    protocol.data_received = on_data  # type: ignore[method-assign]
    protocol.on_message_complete = on_complete  # type: ignore[method-assign]

    call = app.GatewayApp.__call__

    async def app_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            marks.mark("app")
        await call(self, scope, receive, send)

    app.GatewayApp.__call__ = app_call  # type: ignore[method-assign]
    forward, validated_call = api.forward, api._validated_call

    async def forward_marked(*args: Any) -> Any:
        marks.mark("handler")
        return await forward(*args)

    async def validated_marked(*args: Any) -> Any:
        call = await validated_call(*args)
        marks.mark("validated")
        return call

    setattr(api, "forward", forward_marked)  # noqa: B010 (looked up at call time)
    setattr(api, "_validated_call", validated_marked)  # noqa: B010
    open_stream, post = upstream.Upstream.open_stream, workerwire.WireWorkerClient.post

    async def open_marked(self: Any, *args: Any, **kwargs: Any) -> Any:
        marks.mark("open")
        opened = await open_stream(self, *args, **kwargs)
        marks.mark("opened")
        return opened

    async def post_marked(self: Any, *args: Any) -> Any:
        marks.mark("send")
        reply = await post(self, *args)
        marks.mark("headers")
        return reply

    setattr(upstream.Upstream, "open_stream", open_marked)  # noqa: B010 (typed by its signature otherwise)
    setattr(workerwire.WireWorkerClient, "post", post_marked)  # noqa: B010
    wait = workerconnection.WorkerConnection._wait

    async def wait_marked(self: Any) -> None:
        marks.mark("written")  # a request's first wait follows its write at once
        await wait(self)

    setattr(workerconnection.WorkerConnection, "_wait", wait_marked)  # noqa: B010
    open_from_callback = relay.Relay._open_from_callback

    def open_from_callback_marked(self: Any, data: bytes) -> bool:
        marks.mark("first_read")
        taken = open_from_callback(self, data)
        if taken:  # refused, the stream opens from its task: without this stage, the summary leaves it out
            marks.mark("first_body")
        marks.flush()
        return taken

    setattr(relay.Relay, "_open_from_callback", open_from_callback_marked)  # noqa: B010


async def send_one_at_a_time(url: str, requests: int, output_len: int) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": output_len}
        for _ in range(requests):
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                async for _line in response.content:
                    pass
            await asyncio.sleep(0.05)  # the gateway idles between requests, as at concurrency 1


def summarise(out: Path, skip: int) -> str:
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()[skip:]]
    names = [name for name, _ in STAGES]
    complete = [row for row in rows if all(name in row for name in names)]
    if not complete:
        raise SystemExit(f"none of {len(rows)} requests opened from the worker's read callback")
    lines = [f"{len(complete)} requests (after {skip} warm-up ones; {len(rows) - len(complete)} others opened "
             "from their task and are left out); median per stage, ms:", "",
             "| stage | until | median ms |", "|---|---|---|"]
    for (before, _), (after, what) in itertools.pairwise(STAGES):
        median = statistics.median(1000 * (row[after] - row[before]) for row in complete)
        lines.append(f"| {before} → {after} | {what} | {median:.3f} |")
    before_worker = statistics.median(1000 * (row["written"] - row["recv"]) for row in complete)
    after_worker = statistics.median(1000 * (row["first_body"] - row["first_read"]) for row in complete)
    lines += ["", f"In the gateway before the worker has the request: {before_worker:.3f} ms; from the first "
              f"event to the client's first bytes: {after_worker:.3f} ms."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m loadtest.request_path", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--gateway-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/specgate-request-path"))
    p.add_argument("--serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the gateway child
    args = p.parse_args(argv)
    out = args.out_dir / "marks.jsonl"
    if args.serve is not None:
        instrument(Marks(out))
        from gateway.cli import main as gateway_main

        return gateway_main(["gateway", *args.serve])
    pin_self(args.client_cpu)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(engine_timing_args(20.0, 10.0, args.output_len),
                                                  args.client_cpu or None, args.out_dir))
        url = stack.enter_context(start_instrumented_gateway("loadtest.request_path", ["--out-dir", str(args.out_dir)],
                                                             engine.url, args.gateway_cpu or None, args.out_dir))
        say(f"{args.warmup + args.requests} requests, one at a time, through the instrumented gateway")
        asyncio.run(send_one_at_a_time(url, args.warmup + args.requests, args.output_len))
    print(summarise(out, args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
