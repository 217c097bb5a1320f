"""Fake engine settings: timing, output shape and injected faults, from constructor arguments or CLI flags."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Faults answered before any byte of the response, and faults that strike mid-stream.
STATUS_FAULTS = ("400", "429", "500", "503")
STREAM_FAULTS = ("reset", "stall")
FAULT_KINDS = STATUS_FAULTS + STREAM_FAULTS


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Which faults to inject and how often; a request may also name its fault (header or body field)."""

    # (kind, probability) pairs; a tuple so the config stays immutable and hashable.
    probabilities: tuple[tuple[str, float], ...] = ()
    # Data events sent before a mid-stream fault strikes (2 = role chunk + first token for chat).
    after_events: int = 2
    # How long a stalled stream stays silent before it resumes.
    stall_s: float = 3600.0

    def __post_init__(self) -> None:
        total = 0.0
        for kind, probability in self.probabilities:
            if kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"fault probability for {kind} must be in [0, 1], got {probability}")
            total += probability
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities add up to {total:.3f} > 1")
        if self.after_events < 0:
            raise ValueError("after_events must be >= 0")

    @classmethod
    def from_mapping(
        cls, probabilities: Mapping[str, float], after_events: int = 2, stall_s: float = 3600.0
    ) -> FaultConfig:
        return cls(tuple(sorted(probabilities.items())), after_events=after_events, stall_s=stall_s)


@dataclass(frozen=True, slots=True)
class FakeEngineConfig:
    """How the fake vLLM worker behaves; every request gets the same timing unless its headers override it."""

    model: str = "demo"
    ttft_s: float = 0.05
    # Gap between successive token events (one decode step).
    gap_s: float = 0.01
    # Extra time to first token per prompt token, so long prompts cost a longer prefill.
    prefill_s_per_token: float = 0.0
    # Tokens the fake model "wants" to write before its EOS; max_tokens caps it and ignore_eos lifts it.
    output_len: int = 128
    # Tokens per decode event after the first (speculative decoding accepts several tokens per step).
    tokens_per_chunk: int = 1
    token_text: str = " tok"
    chars_per_token: float = 4.0
    # A fixed prompt size instead of the character-based estimate.
    prompt_tokens: int | None = None
    max_model_len: int = 8192
    # Requests beyond this many running wait (vllm:num_requests_waiting); None = unbounded.
    max_running: int | None = None
    # KV cache size in tokens, only for the vllm:kv_cache_usage_perc gauge.
    kv_capacity_tokens: int = 262_144
    faults: FaultConfig = field(default_factory=FaultConfig)
    seed: int | None = None
    # Token i reads " t{i}" and continuations go on from their text's last number (loadtest/fake_numbered.py).
    numbered: bool = False

    def __post_init__(self) -> None:
        if self.ttft_s < 0 or self.gap_s < 0 or self.prefill_s_per_token < 0:
            raise ValueError("timings must be >= 0")
        if self.output_len < 1 or self.tokens_per_chunk < 1 or self.max_model_len < 2:
            raise ValueError("output_len and tokens_per_chunk must be >= 1, max_model_len >= 2")
        if any(ch in self.token_text for ch in '"\\') or any(ord(ch) < 0x20 for ch in self.token_text):
            # Chunks are assembled from pre-encoded bytes, so the text must need no JSON escaping.
            raise ValueError("token_text must not need JSON escaping")
        if self.chars_per_token <= 0:
            raise ValueError("chars_per_token must be > 0")


def _fault_pair(text: str) -> tuple[str, float]:
    kind, sep, probability = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KIND=PROBABILITY, got {text!r}")
    try:
        return kind.strip(), float(probability)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad probability in {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specgate fake-engine",
        description="A fake vLLM worker (test double and benchmark target; never the product path).",
        epilog="Per request: header x-fake-fault: KIND[:AFTER_EVENTS] (or body field fake_fault, or "
               "vllm_xargs.fake_fault), x-fake-ttft-ms, x-fake-gap-ms, x-fake-tokens-per-chunk.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default="demo", help="served model id (default: demo)")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="time to first token")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="gap between token events (decode step)")
    parser.add_argument("--prefill-us-per-token", type=float, default=0.0, help="extra TTFT per prompt token")
    parser.add_argument("--output-len", type=int, default=128, help="tokens before EOS (max_tokens caps it)")
    parser.add_argument("--tokens-per-chunk", type=int, default=1, help="tokens per decode event (spec decoding)")
    parser.add_argument("--token-text", default=" tok")
    parser.add_argument("--chars-per-token", type=float, default=4.0, help="prompt token estimate")
    parser.add_argument("--prompt-tokens", type=int, help="fixed prompt token count instead of the estimate")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-running", type=int, help="requests beyond this many wait")
    parser.add_argument("--kv-capacity-tokens", type=int, default=262_144)
    parser.add_argument("--fault", type=_fault_pair, action="append", default=[], metavar="KIND=PROB",
                        help=f"inject a fault with a probability; KIND in {', '.join(FAULT_KINDS)}")
    parser.add_argument("--fault-after-events", type=int, default=2, help="events sent before reset/stall")
    parser.add_argument("--stall-s", type=float, default=3600.0, help="how long a stall lasts")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--numbered", action="store_true",
                        help="token i reads ' t{i}'; a continuation goes on from its text's last number")
    parser.add_argument("--log-level", default="warning")
    return parser


def config_from_args(args: argparse.Namespace) -> FakeEngineConfig:
    faults = FaultConfig(
        probabilities=tuple(sorted(dict(args.fault).items())),
        after_events=args.fault_after_events,
        stall_s=args.stall_s,
    )
    return FakeEngineConfig(
        model=args.model,
        ttft_s=args.ttft_ms / 1000.0,
        gap_s=args.gap_ms / 1000.0,
        prefill_s_per_token=args.prefill_us_per_token / 1e6,
        output_len=args.output_len,
        tokens_per_chunk=args.tokens_per_chunk,
        token_text=args.token_text,
        chars_per_token=args.chars_per_token,
        prompt_tokens=args.prompt_tokens,
        max_model_len=args.max_model_len,
        max_running=args.max_running,
        kv_capacity_tokens=args.kv_capacity_tokens,
        faults=faults,
        seed=args.seed,
        numbered=args.numbered,
    )


def parse_config(argv: Sequence[str]) -> tuple[FakeEngineConfig, argparse.Namespace]:
    args = build_parser().parse_args(list(argv))
    try:
        return config_from_args(args), args
    except ValueError as exc:
        build_parser().error(str(exc))
        raise  # unreachable: error() exits
