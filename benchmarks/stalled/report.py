"""The Markdown report: the command and setup (the gateway's buffer settings as it reads them), the goals, the
stalled readers beside the live ones, and how to read it."""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.stalled.figures import (
    GOAL_KIB_PER_STREAM,
    at,
    engine_events_per_stream,
    gateway_cpu_share,
    live_fit,
    peak_per_stream_kib,
    rate_per_s,
    rss_bytes_per_event,
)
from benchmarks.stalled.phases import PhaseResult
from benchmarks.stalled.sampling import Sample
from benchmarks.stalled.stack import engine_argv, gateway_env, gateway_settings, inherited_env
from gateway.settings import GatewaySettings
from gateway.upstream.http1.connection import HIGH_WATER


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def _size(value: int) -> str:
    return f"{value // 1024} KiB" if value % 1024 == 0 else f"{value:,} bytes"


def _spread(values: Sequence[float], unit: str = "s", digits: int = 1) -> str:
    if not values:
        return "–"
    return (f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f} {unit}")


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _final(result: PhaseResult) -> Sample:
    assert result.final is not None
    return result.final


def _git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"{head}{' with local changes' if dirty else ''}"


def _send_buffer(settings: GatewaySettings) -> str:
    size = settings.client_send_buffer_bytes
    return _size(size) if size else "0 (the kernel's autotuning)"


def _gateway_setup(args: argparse.Namespace, settings: GatewaySettings) -> str:
    """The variables the benchmark passes, then the buffer settings as the gateway reads them."""
    passed = ", ".join(f"{name}={value}" for name, value in gateway_env(args).items())
    inherited = [name for name in inherited_env() if name not in gateway_env(args)]
    others = "other settings default" + (f" but for {', '.join(inherited)} from the environment" if inherited else "")
    return (f"`specgate gateway`, {passed}, {others}: client_send_buffer_bytes {_send_buffer(settings)}, "
            f"client_write_buffer_bytes {_size(settings.client_write_buffer_bytes)}, worker read high-water "
            f"(HIGH_WATER) {_size(HIGH_WATER)}")


def setup(args: argparse.Namespace, command: str, steal: float | None, took_s: float,
          settings: GatewaySettings) -> list[str]:
    engine_flags = " ".join(shlex.quote(a) for a in engine_argv(args, 0)[4:])
    return [
        "# Clients that stop reading", "", "```", command, "```", "",
        f"On {_git_revision()}, {time.strftime('%Y-%m-%d %H:%M')}; {took_s / 60:.1f} min; CPU time taken by the VM "
        f"host (steal) during the run: {'unknown' if steal is None else f'{steal:.1%}'}. Gateway "
        f"({_gateway_setup(args, settings)}) on core {args.gateway_cpu or 'any'}; "
        f"fake engine (`specgate fake-engine {engine_flags}`, "
        f"{args.token_chars}-character token text, ~{args.token_chars + 200} bytes per event) and this process "
        f"on core {args.client_cpu or 'any'}. Each phase starts a fresh engine and gateway; the RSS baseline is "
        f"read after {args.warmup_requests} streamed requests read to the end. {args.streams} stalled clients: raw "
        f"TCP, SO_RCVBUF {args.rcvbuf} set before connecting, `stream: true`, max_tokens {args.max_tokens}, then no "
        f"reads. Readings every {args.interval_s:g} s; times are from the first connection.",
        "",
    ]


def _orphans_later(result: PhaseResult, args: argparse.Namespace) -> str:
    end = result.watch_end or result.final
    assert end is not None
    if result.orphans_gone_at is not None:
        return f"all gone at t={result.orphans_gone_at:.1f} s"
    return f"{end.orphans} still at t={end.t:.1f} s ({args.orphan_watch_s:g} s later, the clients still connected)"


def goals(args: argparse.Namespace, stalled: PhaseResult) -> list[str]:
    n, final, check = args.streams, _final(stalled), stalled.after_check
    per_stream = peak_per_stream_kib(stalled)
    return [
        "| goal | measured | |",
        "|---|---|---|",
        f"| gateway memory per stalled reader beyond the kernel's buffers ≤ {GOAL_KIB_PER_STREAM:g} KiB | "
        f"{per_stream:.1f} KiB (peak RSS − baseline) / {n} | {_verdict(per_stream <= GOAL_KIB_PER_STREAM)} |",
        f"| client sockets the gateway holds after the deadline (t={final.t:.1f} s): 0 | {final.held} of {n} | "
        f"{_verdict(final.held == 0)} |",
        f"| worker requests still running after the deadline: 0 | {final.engine_running:.0f} | "
        f"{_verdict(final.engine_running == 0)} |",
        f"| the gateway serves a normal streamed request afterwards | HTTP {check.get('status')}, "
        f"{check.get('events')} events, [DONE] {'yes' if check.get('done') else 'no'}, "
        f"{check.get('seconds', 0) * 1000:.0f} ms | {_verdict(bool(check.get('ok')))} |",
        f"| … and their TCP connections closed in the kernel: 0 | {final.orphans} left behind (orphaned, "
        f"{_mib(final.orphan_queue)} still queued), {_orphans_later(stalled, args)} | "
        f"{_verdict(final.orphans == 0)} |",
        "",
    ]


def _orphans_gone(stalled: PhaseResult) -> str:
    final = _final(stalled)
    end = stalled.watch_end or final
    if not final.orphans:
        return "none were left"
    if stalled.orphans_gone_at is not None:
        return f"t={stalled.orphans_gone_at:.1f} s"
    return f"not by t={end.t:.1f} s: {end.orphans} left ({_mib(end.orphan_queue)} queued), then the clients closed"


def comparison(args: argparse.Namespace, stalled: PhaseResult, live: PhaseResult | None) -> list[str]:
    """The stalled readers, beside the live ones (read normally, for as long) when there are."""
    n, final = args.streams, _final(stalled)
    lines = ["| | stalled readers |" + (" live readers (read normally, same time) |" if live else ""),
             "|---|---|" + ("---|" if live else "")]

    def row(label: str, stalled_cell: str, live_cell: str | None = None) -> None:
        lines.append(f"| {label} | {stalled_cell} |" + (f" {live_cell or '–'} |" if live else ""))

    def both(label: str, cell: Callable[[PhaseResult], str]) -> None:
        row(label, cell(stalled), cell(live) if live else None)

    def peak(attr: str) -> Callable[[PhaseResult], float]:
        return lambda r: max(getattr(s, attr) for s in r.samples)

    both("streams opened in", lambda r: f"{r.opened_s:.2f} s")
    both("gateway RSS baseline", lambda r: _mib(r.baseline_kib * 1024))
    both("peak RSS − baseline", lambda r: _mib((peak("rss_kib")(r) - r.baseline_kib) * 1024))
    both("**peak (RSS − baseline) per stream**", lambda r: f"**{peak_per_stream_kib(r):.1f} KiB**")
    both("RSS − baseline per stream at the end of the hold",
         lambda r: f"{(_final(r).rss_kib - r.baseline_kib) / n:.1f} KiB")
    both("peak kernel send queue to the clients, total", lambda r: _mib(peak("send_queue")(r)))
    both("peak kernel send queue per stream (min / median / max)",
         lambda r: _spread([q / 1024 for q in r.peak_queue_per_stream], "KiB"))
    both("peak bytes unread in the gateway's upstream sockets (kernel), total",
         lambda r: _mib(peak("upstream_unread")(r)))
    both("peak bytes in the engine's send queues to the gateway (kernel), total",
         lambda r: _mib(peak("engine_queue")(r)))
    row("streams stalled: send queue stopped growing (first / median / last)", _spread(stalled.stall_times))
    if stalled.t_stall is not None:
        at_stall = at(stalled, stalled.t_stall)
        row(f"RSS − baseline per stream when the last send queue stopped growing (t={at_stall.t:.1f} s)",
            f"{(at_stall.rss_kib - stalled.baseline_kib) / n:.1f} KiB")
    both("events the engine wrote per stream", lambda r: f"{engine_events_per_stream(r):,.0f}")
    row("gateway let go of the sockets (first / median / last)", _spread(stalled.drop_times))
    row("… after its stream stalled (min / median / max)", _spread(stalled.drop_after_stall))
    both(f"sockets the gateway holds at t={final.t:.1f} s", lambda r: f"{_final(r).held}")
    row(f"orphaned kernel sockets at t={final.t:.1f} s (no fd; states)",
        f"{final.orphans} ({_mib(final.orphan_queue)} queued; "
        f"{', '.join(f'{k} {v}' for k, v in sorted(final.states.items())) or 'none'})")
    row("orphaned kernel sockets gone (clients still connected)", _orphans_gone(stalled))
    both("engine running requests at the end of the hold", lambda r: f"{_final(r).engine_running:.0f}")
    both("engine running requests 2 s after the clients closed",
         lambda r: "–" if r.closed is None else f"{r.closed.engine_running:.0f}")
    both("gateway CPU (share of its core over the hold)", lambda r: f"{gateway_cpu_share(r):.0%}")
    if live:
        _live_rows(args, stalled, live, row)
    return lines


def _live_rows(args: argparse.Namespace, stalled: PhaseResult, live: PhaseResult,
               row: Callable[[str, str, str | None], None]) -> None:
    """Rows only the live readers fill: what they were delivered, and their memory per event relayed."""
    n, settle = args.streams, live.hold_s / 2
    offered = n * 1000 / args.gap_ms
    row("delivered to the clients (second half of the hold)", "0",
        f"{rate_per_s(live, 'client_bytes', settle) / 2**20:.1f} MiB/s, "
        f"{rate_per_s(live, 'engine_events', settle):,.0f} engine events/s (offered {offered:,.0f})")
    per_event = rss_bytes_per_event(live, settle)
    growth = rate_per_s(live, "rss_kib", settle) / n
    row("RSS growth per stream (second half of the hold)",
        f"{rate_per_s(stalled, 'rss_kib', (stalled.t_stall or 0) + 2) / n:.2f} KiB/s (after the stall)",
        f"{growth:.2f} KiB/s" + ("" if per_event is None else f", {per_event:.0f} bytes per event relayed"))
    fit = live_fit(live)
    if fit is not None:
        row("live: RSS − baseline per stream = fixed + per event × events (least squares over the hold)", "–",
            f"{fit[0]:.1f} KiB + {fit[1]:.0f} bytes × events")


def how_to_read(settings: GatewaySettings) -> str:
    """What bounds a stalled reader's memory and why its stream ends, from the settings the gateway ran with."""
    write_buffer = settings.client_write_buffer_bytes
    sent = settings.client_send_buffer_bytes
    kernel = (f"The kernel send buffer ({_size(sent)} requested with SO_SNDBUF, which Linux doubles to cover its "
              f"bookkeeping; the send queue above counts the payload in it)" if sent else
              "The kernel send buffer (autotuned: client_send_buffer_bytes is 0; the send queue above)")
    return (
        f"How to read it. Per stream the settings bound the relayed bytes the gateway holds in userland for a "
        f"client that stopped reading: {_size(write_buffer)} queued for the client (client_write_buffer_bytes; "
        f"past it the stream waits for the client) + {_size(HIGH_WATER)} unread from the worker (HIGH_WATER; past "
        f"it the worker socket is not read) = {_size(write_buffer + HIGH_WATER)}. Each limit is checked after a "
        f"write or a read, so each can be passed by one relayed write or one network read. The rest of a "
        f"stream's RSS is its fixed state and what grows with the events relayed (the live column's per-event "
        f"figure) up to the moment it stalled. {kernel} is outside RSS, as are the kernel buffers of the worker "
        f"connection (the upstream unread and engine send queue rows). A stream stalls once all of these are "
        f"full, and the send timeout counts from the write that waits. When it runs out the gateway resets the "
        f"client connection (SO_LINGER 0): the kernel discards what was queued for it at once, rather than "
        f"keeping the socket orphaned in FIN_WAIT1 for as long as the client answers zero-window probes. The "
        f"gateway also closes the worker request, so the engine stops generating for it.")


def render(args: argparse.Namespace, command: str, stalled: PhaseResult, live: PhaseResult | None,
           steal: float | None, took_s: float, png: Path | None) -> str:
    settings = gateway_settings(args)
    lines = [*setup(args, command, steal, took_s, settings), *goals(args, stalled),
             *comparison(args, stalled, live), "", how_to_read(settings)]
    for note in [*stalled.notes, *(live.notes if live else [])]:
        lines.append(f"\nNote: {note}")
    if png is not None:
        lines += ["", f"![RSS, send queue, sockets and running requests over time]({png.name})"]
    return "\n".join(lines) + "\n"
