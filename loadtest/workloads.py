"""Load generator workloads: what to ask, as sessions of one or more dependent requests."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from loadtest.records import RequestSpec

# A session yields requests; each yield receives the reply text of the request it yielded.
Session = Generator[RequestSpec, str, None]

# Prompt sizes are set in tokens and built from words, at about this many characters per token.
CHARS_PER_TOKEN = 4

_VOCABULARY = (
    "the of and to in is that for it as with was on be by this are from at or an have not which but all they "
    "were one their there been has when who will more no if out so what up can about into than them only other "
    "time new some could these two may first then do any like my now over such our man me even most made after "
    "also did many before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since against go came "
    "right used take three system server token stream latency batch cache prefix decode kernel memory request"
)
_WORDS = tuple(_VOCABULARY.split())


def random_text(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of random words (never repeated across calls, so no accidental prefix sharing)."""
    target = max(1, tokens) * CHARS_PER_TOKEN
    words: list[str] = []
    size = 0
    while size < target:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:target]


class Workload(Protocol):
    def sessions(self) -> Iterator[Session]:
        """Sessions to run, in order; may be endless (the run's caps stop it)."""
        ...

    def for_warm_up(self) -> Workload:
        """The workload whose first sessions warm the server up: other prompts than the measured ones, where
        it can make them, so the measured ones do not find their prefill in the server's prefix cache."""
        ...


# Added to a workload's seed for its warm-up prompts.
WARM_UP_SEED_OFFSET = 1_000_003


@dataclass(frozen=True, slots=True)
class RandomPrompts:
    """Independent single requests with random prompts of a fixed size (also the long-prompt scenario)."""

    input_len: int = 256
    output_len: int = 128
    seed: int = 0

    def for_warm_up(self) -> RandomPrompts:
        return dataclasses.replace(self, seed=self.seed + WARM_UP_SEED_OFFSET)

    def sessions(self) -> Iterator[Session]:
        rng = random.Random(self.seed)
        while True:
            yield _single(RequestSpec(prompt=random_text(rng, self.input_len), max_tokens=self.output_len))


def _single(spec: RequestSpec) -> Session:
    yield spec


@dataclass(frozen=True, slots=True)
class SharedPrefixChat:
    """Many users chatting over several rounds: one shared system prompt, each user's history growing."""

    users: int = 32
    turns: int = 4
    system_tokens: int = 1024
    user_tokens: int = 64
    output_len: int = 64
    seed: int = 0

    def for_warm_up(self) -> SharedPrefixChat:
        return dataclasses.replace(self, seed=self.seed + WARM_UP_SEED_OFFSET)

    def sessions(self) -> Iterator[Session]:
        rng = random.Random(self.seed)
        system = {"role": "system", "content": random_text(rng, self.system_tokens)}
        for user in range(self.users):
            # Each user gets its own generator state so the text does not depend on interleaving.
            yield self._conversation(f"user-{user}", system, random.Random(rng.random()))

    def _conversation(self, user: str, system: dict[str, Any], rng: random.Random) -> Session:
        history: list[dict[str, Any]] = [system]
        for turn in range(self.turns):
            history.append({"role": "user", "content": random_text(rng, self.user_tokens)})
            reply = yield RequestSpec(messages=tuple(history), max_tokens=self.output_len, session=user, turn=turn)
            history.append({"role": "assistant", "content": reply})


@dataclass(frozen=True, slots=True)
class TraceReplay:
    """Requests from a JSONL trace: {"timestamp": s, "prompt" | "messages": ..., "max_tokens": n} per line."""

    path: Path
    time_scale: float = 1.0

    def for_warm_up(self) -> TraceReplay:
        return self  # a trace has no other prompts to send

    def sessions(self) -> Iterator[Session]:
        for spec in load_trace(self.path, self.time_scale):
            yield _single(spec)


def load_trace(path: Path, time_scale: float = 1.0) -> list[RequestSpec]:
    """Parse and sort a trace; a bad line is an error naming its line number."""
    specs: list[RequestSpec] = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
                offset = float(item.get("timestamp", 0.0)) * time_scale
                messages = item.get("messages")
                prompt = item.get("prompt")
                if (messages is None) == (prompt is None):
                    raise ValueError("give exactly one of prompt or messages")
                max_tokens = item.get("max_tokens")
                specs.append(RequestSpec(
                    prompt=prompt, messages=tuple(messages) if messages is not None else None,
                    max_tokens=int(max_tokens) if max_tokens is not None else None, at=offset,
                ))
            except (ValueError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from exc
    specs.sort(key=lambda spec: spec.at or 0.0)
    return specs
