"""Distil the EAGLE-3 draft head from the target: generate, extract features, train with training-time test.

Contract: `distill(target_dir, out_dir, recipe)` writes `config.json`, `model.safetensors` (vLLM's EAGLE-3 layout)
and the recipe into out_dir. Fixed seeds and step counts (never time budgets), so every machine builds the
same weights up to floating-point order. The target greedily answers the training prompts; the head learns
the target's next-token distribution (KL over the draft vocabulary) for three drafting steps, each step fed
its own previous hidden state exactly as vLLM drafts (EAGLE-3's "training-time test").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.smollm2.head import Eagle3Head
from engine.smollm2.prompts import training_prompts

Say = Callable[[str], None]


@dataclass(frozen=True)
class DraftRecipe:
    """Everything that decides the draft's weights; a change rebuilds it."""

    version: int = 2
    seed: int = 0
    prompts: int = 672
    max_new_tokens: int = 128
    generation_batch: int = 64
    draft_vocab_size: int = 4096
    aux_layers: tuple[int, ...] = (2, 15, 27)
    drafting_steps: int = 3
    step_weight_decay: float = 0.8
    train_steps: int = 700
    batch_sequences: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 20


@dataclass
class Example:
    ids: torch.Tensor  # (L,) prompt and answer
    answer_start: int  # index of the answer's first token
    aux: torch.Tensor  # (L, 3 * hidden) the residual stream entering the aux layers
    teacher: torch.Tensor  # (L, draft vocab) the target's logits for the next token, over the draft vocabulary


def generate(target: Any, tokenizer: Any, prompts: list[str], recipe: DraftRecipe, say: Say
             ) -> list[tuple[torch.Tensor, int]]:
    """The target's greedy answers as (prompt + answer ids, answer start), in batches with left padding."""
    tokenizer.padding_side = "left"
    sequences: list[tuple[torch.Tensor, int]] = []
    started = time.monotonic()
    for start in range(0, len(prompts), recipe.generation_batch):
        chunk = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
                 for prompt in prompts[start : start + recipe.generation_batch]]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = target.generate(**batch, max_new_tokens=recipe.max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        width = batch["attention_mask"].shape[1]
        for row, mask in zip(out, batch["attention_mask"], strict=True):
            answer = row[width:]
            ends = (answer == tokenizer.eos_token_id).nonzero()
            if len(ends):
                answer = answer[: int(ends[0]) + 1]
            sequences.append((torch.cat([row[:width][mask.bool()], answer]), int(mask.sum())))
        done = start + len(chunk)
        left = (time.monotonic() - started) / done * (len(prompts) - done)
        say(f"  generated {done}/{len(prompts)} answers (about {left:.0f}s left)")
    return sequences


def choose_vocabulary(sequences: list[torch.Tensor], size: int, always: list[int]) -> torch.Tensor:
    """The `size` most frequent target ids in the answers (plus `always`), ascending: draft id -> target id."""
    counts = torch.bincount(torch.cat(sequences), minlength=1)
    for token in always:
        counts[token] = counts.max() + 1
    chosen = torch.topk(counts.float(), min(size, len(counts))).indices
    return torch.sort(chosen).values


def extract(target: Any, sequences: list[tuple[torch.Tensor, int]], vocabulary: torch.Tensor,
            recipe: DraftRecipe, say: Say) -> list[Example]:
    """Run the target once over every sequence (batched, right-padded) and keep what training needs."""
    examples: list[Example] = []
    batch = 16
    for start in range(0, len(sequences), batch):
        chunk = [sequence for sequence, _ in sequences[start : start + batch]]
        ids = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True, padding_value=0)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in chunk], batch_first=True)
        with torch.no_grad():
            out = target(ids, attention_mask=mask, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[layer] for layer in recipe.aux_layers], -1)
        teacher = out.logits[:, :, vocabulary]
        for row, sequence in enumerate(chunk):
            length = len(sequence)
            examples.append(Example(sequence, sequences[start + row][1], aux[row, :length].to(torch.bfloat16),
                                    teacher[row, :length].to(torch.bfloat16)))
        say(f"  target features for {len(examples)}/{len(sequences)} sequences")
    return examples


def _ttt_mask(length: int, step: int) -> torch.Tensor:
    """Step `step` (0-based) attends the first pass causally and each later pass only at its own anchor."""
    blocks = [torch.ones(length, length, dtype=torch.bool).tril()]
    blocks += [torch.eye(length, dtype=torch.bool) for _ in range(step)]
    return torch.cat(blocks, dim=1)


def _batch(examples: list[Example]) -> tuple[torch.Tensor, ...]:
    length = max(len(example.ids) for example in examples)

    def pad(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=0)[:, :length]

    lengths = torch.tensor([len(example.ids) for example in examples])
    starts = torch.tensor([example.answer_start for example in examples])
    return (pad([e.ids for e in examples]), pad([e.aux for e in examples]).float(),
            pad([e.teacher for e in examples]).float(), lengths, starts)


def drafting_loss(head: Eagle3Head, embed: torch.nn.Embedding, examples: list[Example],
                  recipe: DraftRecipe) -> tuple[torch.Tensor, float]:
    """KL(target || draft) summed over the drafting steps; also the first step's top-1 agreement."""
    ids, aux, teacher, lengths, starts = _batch(examples)
    batch, length = ids.shape
    anchors = torch.arange(length)
    hidden = head.fc(aux)
    past: tuple[torch.Tensor, torch.Tensor] | None = None
    total = torch.zeros(())
    agreement = 0.0
    for step in range(recipe.drafting_steps):
        shift = step + 1  # the input token is x[anchor + shift]; the target is teacher[anchor + shift]
        tokens = F.pad(ids[:, shift:], (0, shift))
        wanted = F.pad(teacher[:, shift:], (0, 0, 0, shift))
        # Only where the token predicted (x[anchor + shift + 1]) is part of the answer: that is what is drafted.
        valid = (anchors[None] < (lengths[:, None] - shift)) & (anchors[None] + shift + 1 >= starts[:, None])
        logits, hidden, past = head.step(embed(tokens), hidden, (anchors + step).expand(batch, -1),
                                         _ttt_mask(length, step), past)
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(wanted, -1), log_target=True, reduction="none")
        total = total + recipe.step_weight_decay**step * (kl.sum(-1) * valid).sum() / valid.sum()
        if step == 0:
            agreement = float(((logits.argmax(-1) == wanted.argmax(-1)) & valid).sum() / valid.sum())
    return total, agreement


def train(head: Eagle3Head, embed: torch.nn.Embedding, examples: list[Example], recipe: DraftRecipe,
          say: Say) -> dict[str, float]:
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / recipe.warmup_steps)
        * 0.5 * (1 + math.cos(math.pi * min(step, recipe.train_steps) / recipe.train_steps)))
    started = last_report = time.monotonic()
    smoothed_loss = smoothed_agreement = 0.0
    for step in range(1, recipe.train_steps + 1):
        picks = torch.randint(len(examples), (recipe.batch_sequences,), generator=generator).tolist()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, agreement = drafting_loss(head, embed, [examples[i] for i in picks], recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        smoothed_loss = float(loss.detach()) if step == 1 else 0.95 * smoothed_loss + 0.05 * float(loss.detach())
        smoothed_agreement = agreement if step == 1 else 0.95 * smoothed_agreement + 0.05 * agreement
        now = time.monotonic()
        if now - last_report >= 15 or step == recipe.train_steps:
            last_report = now
            left = (now - started) / step * (recipe.train_steps - step)
            say(f"  step {step}/{recipe.train_steps}: KL {smoothed_loss:.3f}, first-token agreement "
                f"{smoothed_agreement:.3f} (about {left:.0f}s left)")
    return {"final_kl": round(smoothed_loss, 4), "first_token_agreement": round(smoothed_agreement, 4)}


def initial_head(target: Any, vocabulary: torch.Tensor, recipe: DraftRecipe) -> Eagle3Head:
    """Random layer; the head and final norm start as the target's own (tied embeddings, final norm)."""
    torch.manual_seed(recipe.seed)
    head = Eagle3Head(target.config, len(vocabulary), recipe.aux_layers)
    hidden = target.config.hidden_size
    with torch.no_grad():
        head.lm_head.weight.copy_(target.get_output_embeddings().weight[vocabulary])
        head.norm.weight.copy_(target.model.norm.weight)
        head.fc.weight.mul_(0.1)
        head.fc.weight[:, -hidden:] += torch.eye(hidden)  # start from the deepest aux layer's stream
    return head


def distill(target_dir: Path, out_dir: Path, recipe: DraftRecipe, say: Say) -> dict[str, Any]:
    """Build the draft head for the target in target_dir; returns facts for the manifest."""
    import copy
    import json

    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    prompts = training_prompts(recipe.seed)[: recipe.prompts]
    say(f"the target answers {len(prompts)} training prompts (greedy, up to {recipe.max_new_tokens} tokens)")
    # The answers take most of the build; they are kept beside the models so a changed training recipe reuses them.
    cache = out_dir.parent / ".cache" / (f"smollm2-answers-seed{recipe.seed}-n{len(prompts)}-"
                                         f"t{recipe.max_new_tokens}-b{recipe.generation_batch}.pt")
    if cache.is_file():
        sequences = torch.load(cache)
        say(f"reusing {len(sequences)} answers from {cache}")
    else:
        # Generated in bf16 (1.4x faster here); the teacher's logits are then taken in float32.
        sequences = generate(copy.deepcopy(target).to(torch.bfloat16), tokenizer, prompts, recipe, say)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sequences, cache)
    vocabulary = choose_vocabulary([ids[start:] for ids, start in sequences], recipe.draft_vocab_size,
                                   [tokenizer.eos_token_id])
    say(f"draft vocabulary: {len(vocabulary)} of {target.config.vocab_size} tokens")
    examples = extract(target, sequences, vocabulary, recipe, say)
    head = initial_head(target, vocabulary, recipe)
    embed = target.get_input_embeddings().requires_grad_(False)
    say(f"training the head: {recipe.train_steps} steps of {recipe.batch_sequences} sequences")
    facts = train(head, embed, examples, recipe, say)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(head.vllm_state_dict(vocabulary), str(out_dir / "model.safetensors"))
    config = target.config.to_dict()
    config.update(num_hidden_layers=1, tie_word_embeddings=False, draft_vocab_size=len(vocabulary),
                  architectures=["LlamaForCausalLM"],
                  eagle_config={"eagle_aux_hidden_state_layer_ids": list(recipe.aux_layers)})
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"training_answers": len(sequences), "answer_tokens": sum(len(ids) - start for ids, start in sequences),
            **facts}
