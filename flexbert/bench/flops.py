"""Forward FLOPs per token of a FlexBERT encoder: what a tokens/s figure means on the hardware.

Matmuls: 2 x (Wqkv + Wo + Wi + Wo of the MLP) per layer. Attention: 4 x hidden x context per
layer (QK^T and AV), where the context is the sequence length for a global layer and at most
the window for a local one. Embeddings and norms are left out (a few percent at most).
ModernBERT-base: ~239 MFLOP per token at 512 tokens, ~427 at 8192.
"""

from __future__ import annotations

from flexbert.config import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, seq_len: float) -> float:
    """Forward FLOPs per real token for sequences of `seq_len` tokens (a mean is fine)."""
    d, inter = cfg.hidden_size, cfg.intermediate_size
    mlp_in = 2 * inter if cfg.mlp.name == "glu" else inter
    matmul = 2 * (d * 3 * d + d * d + d * mlp_in + inter * d)
    window = cfg.attention_pattern.window or seq_len
    total = 0.0
    for kind in cfg.layer_types:
        context = seq_len if kind == "global" else min(seq_len, window)
        total += matmul + 4 * d * context
    return total
