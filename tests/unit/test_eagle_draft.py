"""The EAGLE-3 draft's pieces that need no vLLM: prompts, the head's layout, the training-time-test loss."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.smollm2.distill import DraftRecipe, Example, _ttt_mask, choose_vocabulary, drafting_loss  # noqa: E402
from engine.smollm2.head import Eagle3Head  # noqa: E402
from engine.smollm2.prompts import held_out_prompts, training_prompts  # noqa: E402

# The names vLLM's Eagle3LlamaForCausalLM.load_weights maps (midlayer. -> layers.0.; d2t -> draft_id_to_target_id).
VLLM_NAMES = {
    "fc.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
    "norm.weight", "lm_head.weight", "d2t",
}


def tiny_config() -> object:
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=60, num_hidden_layers=4)


def test_held_out_prompts_share_no_subject_with_training() -> None:
    training, held_out = set(training_prompts()), set(held_out_prompts(500))
    assert len(training) == 672 and len(held_out) == 208
    assert not training & held_out
    assert training_prompts(0) == training_prompts(0) != training_prompts(1)


def test_the_head_saves_under_vllms_names_with_a_draft_to_target_map() -> None:
    vocabulary = torch.tensor([2, 5, 9, 40])
    head = Eagle3Head(tiny_config(), len(vocabulary), (1, 2, 3))
    state = head.vllm_state_dict(vocabulary)
    assert set(state) == VLLM_NAMES
    assert state["fc.weight"].shape == (32, 96)
    assert state["midlayer.self_attn.q_proj.weight"].shape == (32, 64)  # reads [embedding, hidden]
    assert state["lm_head.weight"].shape == (4, 32)
    # vLLM: target id = draft id + d2t[draft id].
    assert (torch.arange(4) + state["d2t"]).tolist() == [2, 5, 9, 40]


def test_the_vocabulary_keeps_the_most_frequent_answer_tokens_and_eos() -> None:
    sequences = [torch.tensor([7, 7, 7, 3, 3, 1]), torch.tensor([7, 3, 4])]
    assert choose_vocabulary(sequences, 3, always=[0]).tolist() == [0, 3, 7]


def test_later_drafting_steps_see_the_first_pass_causally_and_themselves_only() -> None:
    mask = _ttt_mask(4, 2)
    assert mask.shape == (4, 12)
    assert mask[2, :4].tolist() == [True, True, True, False]
    assert mask[2, 4:8].tolist() == [False, False, True, False]
    assert mask[2, 8:].tolist() == [False, False, True, False]


def test_training_lowers_the_drafting_loss() -> None:
    torch.manual_seed(0)
    recipe = DraftRecipe(aux_layers=(1, 2, 3), drafting_steps=3)
    head = Eagle3Head(tiny_config(), 12, recipe.aux_layers)
    embed = torch.nn.Embedding(60, 32).requires_grad_(False)
    examples = [Example(torch.randint(60, (length,)), 2, torch.randn(length, 96), torch.randn(length, 12) * 3)
                for length in (9, 12, 7)]
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    first, _ = drafting_loss(head, embed, examples, recipe)
    for _ in range(30):
        loss, _ = drafting_loss(head, embed, examples, recipe)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last, agreement = drafting_loss(head, embed, examples, recipe)
    assert torch.isfinite(first) and float(last) < 0.5 * float(first)
    assert 0.0 <= agreement <= 1.0
