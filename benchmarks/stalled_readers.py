"""Clients that stop reading: what the gateway holds for them, and whether it lets them go.

    flock /tmp/specgate-heavy.lock .venv/bin/python -m benchmarks.stalled_readers --streams 300 --send-timeout-s 20

The goal: N stalled readers hold <= 64 KiB of gateway memory each beyond the kernel's buffers; after the
deadline (the streams stalled + the send timeout), 0 of their sockets remain open at the gateway and the worker
runs 0 of their requests.

Two phases, each on a fresh fake engine (`specgate fake-engine`, pinned to --client-cpu with this process) and a
fresh gateway (`specgate gateway`, pinned to --gateway-cpu, SPECGATE_SSE_SEND_TIMEOUT_S=--send-timeout-s):

- stalled: after a warm-up of a few streamed requests read to the end (the RSS baseline), N raw TCP clients with
  a small SO_RCVBUF send a streaming chat request with a large max_tokens and then read nothing. Every
  --interval-s: the gateway's RSS, the kernel send queue (tx_queue in /proc/net/tcp) of its sockets to those
  clients, how many of them it still holds (psutil), orphaned kernel sockets left after it let go, and the
  engine's running requests. A stream has stalled when its send queue stops growing; the run goes on until the
  last one stalled + the send timeout + --margin-s, then checks that the gateway still serves a request, and
  watches the orphaned kernel sockets for up to --orphan-watch-s with the clients still connected.
- live: the same N streams read normally for the same time, so the stalled figures read against live readers.

Writes --out (Markdown, the command at its top) and a PNG beside it (same name, .png). The parts are in
benchmarks/stalled/: stack (the processes), clients, sampling (the readings), phases, figures, report and plot.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.bench_measure import host_steal, say, steal_share_since
from benchmarks.stalled.phases import PhaseResult, live_phase, stalled_phase
from benchmarks.stalled.plot import plot
from benchmarks.stalled.report import render
from loadtest.procs import pin_self, raise_open_file_limit

RESULTS = Path(__file__).parent / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stalled_readers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=300, help="clients that stop reading (and, live, that read)")
    p.add_argument("--send-timeout-s", type=float, default=20.0, help="SPECGATE_SSE_SEND_TIMEOUT_S")
    p.add_argument("--out", type=Path, default=RESULTS / "stalled-readers.md", help="report; the plot goes beside it")
    p.add_argument("--rcvbuf", type=int, default=4096, help="SO_RCVBUF of the stalled clients")
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--gap-ms", type=float, default=10.0)
    p.add_argument("--output-len", type=int, default=100_000, help="the engine's output length per request")
    p.add_argument("--max-tokens", type=int, default=100_000)
    p.add_argument("--token-chars", type=int, default=256, help="characters of text per token (event size)")
    p.add_argument("--warmup-requests", type=int, default=6,
                   help="streamed requests read to the end before the baseline")
    p.add_argument("--interval-s", type=float, default=0.5, help="time between readings")
    p.add_argument("--progress-every", type=int, default=4, help="print every this many readings")
    p.add_argument("--quiet-s", type=float, default=2.0, help="no send queue grew this long: the streams stalled")
    p.add_argument("--max-fill-s", type=float, default=120.0, help="give up waiting for the stall after this long")
    p.add_argument("--margin-s", type=float, default=10.0, help="measure this long after stall + send timeout")
    p.add_argument("--orphan-watch-s", type=float, default=180.0,
                   help="then watch orphaned kernel sockets this long at most (clients still connected)")
    p.add_argument("--no-live", action="store_true", help="skip the comparison with readers that read")
    p.add_argument("--gateway-cpu", default="0", help="core for the gateway ('' = no pinning)")
    p.add_argument("--client-cpu", default="1", help="core for the fake engine and this process")
    p.add_argument("--log-dir", type=Path, help="process logs (default: a temporary directory)")
    p.add_argument("--no-plot", action="store_true")
    return p


async def run(args: argparse.Namespace, log_dir: Path) -> tuple[PhaseResult, PhaseResult | None]:
    stalled = await stalled_phase(args, log_dir)
    live = None if args.no_live else await live_phase(args, log_dir, stalled.hold_s)
    return stalled, live


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.stalled_readers", *argv])
    raise_open_file_limit()
    pin_self(args.client_cpu or None)  # this process shares the engine's core
    gc.collect()
    gc.freeze()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="stalled-readers-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    say(f"process logs in {log_dir}")
    started, steal_before = time.monotonic(), host_steal()
    stalled, live = uvloop.run(run(args, log_dir))
    steal = steal_share_since(steal_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = None if args.no_plot else plot(stalled, live, args, args.out.with_suffix(".png"))
    report = render(args, command, stalled, live, steal, time.monotonic() - started, png)
    args.out.write_text(report)
    print(report)
    say("wrote " + ", ".join(str(p) for p in (args.out, png) if p is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
