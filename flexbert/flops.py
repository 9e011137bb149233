"""Forward FLOPs per token of a FlexBERT encoder: what a tokens/s figure means on the hardware.

Matmuls: 2 x (Wqkv + Wo + Wi + Wo of the MLP) per layer. Attention: 4 x hidden x context per
layer (QK^T and AV), where the context is the sequence length for a global layer and at most
the window for a local one. Embeddings and norms are left out (a few percent at most).
ModernBERT-base: ~239 MFLOP per token at 512 tokens, ~427 at 8192. Training counts 3x the
forward (the backward is two matmuls per forward one). Used by flexbert-bench for its targets
and by pretraining for Composer's SpeedMonitor (`throughput/device/mfu` on known GPUs).
"""

from __future__ import annotations

from collections.abc import Iterable

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


def encoder_forward_flops(cfg: ModelConfig, lengths: Iterable[int]) -> float:
    """Forward FLOPs of the encoder over sequences of these lengths (attention per sequence)."""
    return sum(n * forward_flops_per_token(cfg, n) for n in lengths)


def mlm_head_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of the MLM head per decoded token: dense d x d, then the d x V decoder."""
    d = cfg.hidden_size
    return 2 * (d * d + d * cfg.vocab_size)


def mlm_train_flops(cfg: ModelConfig, lengths: Iterable[int], decoded_tokens: int) -> float:
    """FLOPs of one MLM training pass (forward + backward = 3 x forward) over sequences of
    these lengths, the head decoding `decoded_tokens` of them (all, or the masked ones with
    sparse prediction)."""
    forward = encoder_forward_flops(cfg, lengths) + decoded_tokens * mlm_head_flops_per_token(cfg)
    return 3 * forward
