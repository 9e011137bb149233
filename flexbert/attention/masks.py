"""Dense boolean attention masks (True = may attend) for the eager and sdpa backends.

`half` is half the local window: a key j is visible from query i when |i - j| <= half.
Rows of padding queries are left fully open so softmax never sees an all-masked row.
"""

from __future__ import annotations

import torch

from flexbert.layout import Layout


def padded_mask(layout: Layout, half: int | None) -> torch.Tensor:
    """(B, 1, L, L) mask for padded (B, L) batches."""
    mask = layout.attention_mask.bool()  # (B, L)
    seqlen = mask.shape[1]
    allowed = mask[:, None, None, :].expand(-1, 1, seqlen, -1)  # keys must be real
    if half is not None:
        idx = torch.arange(seqlen, device=mask.device)
        band = (idx[:, None] - idx[None, :]).abs() <= half  # (L, L)
        allowed = allowed & band
    return allowed | ~mask[:, None, :, None]


def block_diagonal_mask(layout: Layout, half: int | None) -> torch.Tensor:
    """(1, 1, T, T) mask for unpadded tokens: same sequence (and within the window)."""
    seq = layout.seq_ids()
    allowed = seq[:, None] == seq[None, :]
    if half is not None:
        pos = layout.pos_in_seq()
        allowed = allowed & ((pos[:, None] - pos[None, :]).abs() <= half)
    return allowed[None, None]
