"""Sequence pooling for classification and embeddings: `cls` (first token) and `mean`.

Both work on either layout: padded hidden states (B, L, D) with a (B, L) mask, or unpadded
(T, D) with `cu_seqlens`; padding never enters the mean.
"""

from __future__ import annotations

import torch

from flexbert.registry import ComponentConfig, Registry

POOLINGS = Registry("pooling")


@POOLINGS.register("cls")
def cls_pool(
    cfg: ComponentConfig,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sequence's first real token ([CLS]; with left padding, after the padding); a
    sequence without any real token pools to zeros."""
    if cu_seqlens is not None:
        starts = cu_seqlens[:-1].long()
        first = hidden[starts.clamp(max=max(hidden.shape[0] - 1, 0))]  # (B, D)
        return first.masked_fill((cu_seqlens[1:] == starts)[:, None], 0)
    if attention_mask is None:
        return hidden[:, 0]  # (B, D)
    real = attention_mask.bool()
    first = hidden[torch.arange(hidden.shape[0], device=hidden.device), real.int().argmax(dim=1)]
    return first.masked_fill(~real.any(dim=1)[:, None], 0)


@POOLINGS.register("mean")
def mean_pool(
    cfg: ComponentConfig,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (B,)
        seq_ids = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=hidden.device),
            lengths,
            output_size=hidden.shape[0],
        )
        sums = hidden.new_zeros(lengths.numel(), hidden.shape[-1]).index_add_(0, seq_ids, hidden)
        return sums / lengths.clamp(min=1).unsqueeze(-1).to(hidden.dtype)
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
