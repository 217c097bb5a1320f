"""An EAGLE-3 draft head in PyTorch, laid out exactly as vLLM's `Eagle3LlamaForCausalLM` runs it.

The head reads three of the target's hidden states (the residual stream entering layers `aux_layers`), the
embedding of the next token, and predicts the token after it over a reduced draft vocabulary. vLLM maps draft
ids back to target ids with `d2t` (target id = draft id + d2t[draft id]). The state dict this module saves
uses the names vLLM loads (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`); embeddings are shared with the target.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Eagle3Head(nn.Module):
    """One decoder layer whose attention reads [norm(embedding), norm(hidden)] (2 x hidden wide)."""

    def __init__(self, config: Any, draft_vocab_size: int, aux_layers: tuple[int, ...]) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.heads
        self.aux_layers = aux_layers
        self.rope_theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        self.fc = nn.Linear(hidden * len(aux_layers), hidden, bias=False)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.q_proj = nn.Linear(2 * hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.gate_proj = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        inverse = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        angles = positions.float()[..., None] * inverse
        cos = torch.cat((angles, angles), -1).cos()[:, None].to(x.dtype)
        sin = torch.cat((angles, angles), -1).sin()[:, None].to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def _project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        return self._rope(q, positions), self._rope(k, positions), v

    def step(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One drafting step over a whole sequence: (logits, pre-norm hidden fed to the next step, this step's k/v).

        `past` holds earlier steps' keys and values (training-time test); `mask` is boolean, True = may attend.
        """
        residual = hidden
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        q, k, v = self._project(x, positions)
        keys, values = (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)) if past is not None else (k, v)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        batch, _, length, _ = attended.shape
        residual = self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1)) + residual
        pre_norm = self.down_proj(F.silu(self.gate_proj(h := self.post_attention_layernorm(residual)))
                                  * self.up_proj(h)) + residual
        return self.lm_head(self.norm(pre_norm)), pre_norm, (keys, values)

    def vllm_state_dict(self, draft_to_target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weights under the names vLLM's EAGLE-3 loader expects."""
        names = {
            "fc": "fc", "input_layernorm": "midlayer.input_layernorm", "hidden_norm": "midlayer.hidden_norm",
            "q_proj": "midlayer.self_attn.q_proj", "k_proj": "midlayer.self_attn.k_proj",
            "v_proj": "midlayer.self_attn.v_proj", "o_proj": "midlayer.self_attn.o_proj",
            "post_attention_layernorm": "midlayer.post_attention_layernorm", "gate_proj": "midlayer.mlp.gate_proj",
            "up_proj": "midlayer.mlp.up_proj", "down_proj": "midlayer.mlp.down_proj", "norm": "norm",
            "lm_head": "lm_head",
        }
        state = {f"{names[key.rsplit('.', 1)[0]]}.weight": value.detach().contiguous()
                 for key, value in self.state_dict().items()}
        state["d2t"] = (draft_to_target - torch.arange(len(draft_to_target))).to(torch.int64)
        return state
