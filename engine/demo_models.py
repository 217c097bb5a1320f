"""Demo models: a small Llama-shaped target and a distilled draft sharing one byte-level BPE tokenizer.

Trained on the Python standard library's sources, which every machine has, so nothing is downloaded.
Needs torch, transformers and tokenizers (the `cpu`, `gpu` or `models` extra).
"""

from __future__ import annotations

import json
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RECIPE_VERSION = 2
MANIFEST = "specgate_model.json"
TARGET_DIR = "demo-target"
DRAFT_DIR = "demo-draft"
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the models; a change rebuilds them."""

    version: int = RECIPE_VERSION
    seed: int = 0
    corpus_bytes: int = 6_000_000
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    target_layers: int = 4
    draft_layers: int = 1
    heads: int = 4
    max_positions: int = 2048
    window: int = 128
    batch: int = 16
    # Step counts, not time budgets, so every machine builds the same weights (about 5 min on 2 cores).
    target_steps: int = 180
    draft_steps: int = 240
    learning_rate: float = 3e-3
    warmup_steps: int = 15


def default_models_dir() -> Path:
    import os

    configured = os.environ.get("SPECGATE_MODELS_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "specgate" / "models"


def models_ready(models_dir: Path, recipe: Recipe | None = None) -> bool:
    wanted = asdict(recipe or Recipe())
    for name in (TARGET_DIR, DRAFT_DIR):
        manifest = models_dir / name / MANIFEST
        if not manifest.is_file():
            return False
        if json.loads(manifest.read_text()).get("recipe") != wanted:
            return False
    return True


def _say(message: str) -> None:
    print(f"[models] {message}", file=sys.stderr, flush=True)


def collect_corpus(max_bytes: int) -> list[str]:
    """Standard-library sources in a fixed order, so every machine builds the same corpus."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def build_demo_models(models_dir: Path, recipe: Recipe | None = None, force: bool = False) -> Path:
    """Build (or reuse) the target and draft under models_dir; returns models_dir."""
    recipe = recipe or Recipe()
    if not force and models_ready(models_dir, recipe):
        _say(f"demo models already built in {models_dir}")
        return models_dir
    import torch

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.monotonic()
    _say(f"collecting corpus from the standard library ({recipe.corpus_bytes / 1e6:.0f} MB)")
    corpus = collect_corpus(recipe.corpus_bytes)
    tokenizer = _train_tokenizer(corpus, recipe)
    ids = _encode_corpus(tokenizer, corpus)
    _say(f"tokenizer ready: {len(tokenizer)} tokens; corpus is {ids.numel():,} tokens")

    target = _new_model(recipe, recipe.target_layers, tokenizer)
    target_loss, target_steps = _train_target(target, ids, recipe)
    draft = _new_model(recipe, recipe.draft_layers, tokenizer)
    draft_loss, draft_steps = _distill_draft(draft, target, ids, recipe)

    for name, model, info in (
        (TARGET_DIR, target, {"role": "target", "train_steps": target_steps, "final_loss": target_loss}),
        (DRAFT_DIR, draft, {"role": "draft", "distill_steps": draft_steps, "final_kl": draft_loss}),
    ):
        out = models_dir / name
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        manifest = {
            "recipe": asdict(recipe),
            "made_by": "specgate models build",
            "corpus": f"{len(corpus)} Python standard library files, {sum(map(len, corpus)):,} characters",
            "parameters": sum(p.numel() for p in model.parameters()),
            **info,
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _say(f"done in {time.monotonic() - started:.0f}s: {models_dir / TARGET_DIR}, {models_dir / DRAFT_DIR}")
    return models_dir


def _train_tokenizer(corpus: list[str], recipe: Recipe) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    _say(f"training a byte-level BPE tokenizer ({recipe.vocab_size} tokens)")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=recipe.max_positions,
    )


def _encode_corpus(tokenizer: Any, corpus: list[str]) -> Any:
    import torch

    eos = tokenizer.eos_token_id
    pieces: list[int] = []
    for encoded in tokenizer(corpus, add_special_tokens=False)["input_ids"]:
        pieces.extend(encoded)
        pieces.append(eos)
    return torch.tensor(pieces, dtype=torch.long)


def _new_model(recipe: Recipe, layers: int, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)  # type: ignore[no-untyped-call]


def _batches(ids: Any, recipe: Recipe, generator: Any) -> Any:
    import torch

    while True:
        starts = torch.randint(0, ids.numel() - recipe.window - 1, (recipe.batch,), generator=generator)
        yield torch.stack([ids[s : s + recipe.window] for s in starts.tolist()])


def _train_target(model: Any, ids: Any, recipe: Recipe) -> tuple[float, int]:
    import torch

    _say(f"training the {recipe.target_layers}-layer target for {recipe.target_steps} steps")
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    batches = _batches(ids, recipe, torch.Generator().manual_seed(recipe.seed))
    model.train()

    def lm_step() -> Any:
        batch = next(batches)
        return model(input_ids=batch, labels=batch).loss

    return _train_loop(recipe, recipe.target_steps, lm_step, optimizer, "target loss")


def _distill_draft(draft: Any, target: Any, ids: Any, recipe: Recipe) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    _say(f"distilling the {recipe.draft_layers}-layer draft from the target for {recipe.draft_steps} steps")
    target.eval()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    batches = _batches(ids, recipe, torch.Generator().manual_seed(recipe.seed + 1))
    draft.train()

    def kl_step() -> Any:
        batch = next(batches)
        with torch.no_grad():
            teacher = F.log_softmax(target(input_ids=batch).logits, dim=-1)
        student = F.log_softmax(draft(input_ids=batch).logits, dim=-1)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean") / batch.shape[1]

    return _train_loop(recipe, recipe.draft_steps, kl_step, optimizer, "draft KL")


def _train_loop(recipe: Recipe, steps: int, loss_of_step: Any, optimizer: Any, label: str) -> tuple[float, int]:
    """Warm-up then cosine decay; progress every ~10 s with an estimate of the time left."""
    import math

    import torch

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / recipe.warmup_steps)
        * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    started = time.monotonic()
    smoothed = float("nan")
    last_report = started
    for step in range(1, steps + 1):
        loss = loss_of_step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        smoothed = value if step == 1 else 0.9 * smoothed + 0.1 * value
        now = time.monotonic()
        if now - last_report >= 10:
            last_report = now
            left = (now - started) / step * (steps - step)
            _say(f"  step {step}/{steps}: {label} {smoothed:.3f} (about {left:.0f}s left)")
    _say(f"  finished {steps} steps in {time.monotonic() - started:.0f}s: {label} {smoothed:.3f}")
    return smoothed, steps
