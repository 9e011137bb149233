"""The one Attention module: projections + RoPE, then the configured backend does the math."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from flexbert.attention.backends import BACKENDS
from flexbert.components.position import apply_rotary
from flexbert.layout import Layout

if TYPE_CHECKING:
    from flexbert.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.layer_type = cfg.layer_types[layer_idx]
        window = cfg.attention_pattern.window
        self.half_window = window // 2 if self.layer_type == "local" else None
        self.attention_dropout = cfg.attention_dropout
        backend = BACKENDS.build(cfg.backend)
        backend.check(cfg)
        self.backend = backend.fn
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.Wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attn_out_bias)
        out_dropout = cfg.attention_out_dropout
        self.out_drop = nn.Dropout(cfg.attention_dropout if out_dropout is None else out_dropout)

    def forward(
        self,
        x: torch.Tensor,  # (T, D) unpadded or (B, L, D) padded
        layout: Layout,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        qkv = self.Wqkv(x).view(*lead, 3, self.num_heads, self.head_dim)  # (..., 3, H, Dh)
        q, k, v = qkv.unbind(dim=-3)  # (..., H, Dh) each
        if rotary is not None:
            q, k = apply_rotary(q, k, *rotary)
        dropout_p = self.attention_dropout if self.training else 0.0
        out = self.backend(q, k, v, layout, self.half_window, dropout_p, self.scale)
        hidden = self.num_heads * self.head_dim  # not -1: a batch may hold no tokens
        return self.out_drop(self.Wo(out.reshape(*lead, hidden)))  # (..., D)
