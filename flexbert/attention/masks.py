"""Dense boolean attention masks (True = may attend) for the eager and sdpa backends.

`half` is half the local window: a key j is visible from query i when |i - j| <= half.
Padding queries see what a real query at their place would (real keys, within the window), as
Hugging Face's masks give them: their outputs are what ColBERT's unattended [MASK] expansion
tokens score. A row with no key to see is left open so softmax never sees an all-masked row,
and its output is then zeroed (`rows_with_keys`), as transformers' sdpa attention gives it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexbert.layout import Layout


def padded_mask(layout: Layout, half: int | None) -> torch.Tensor | None:
    """Smallest mask for padded (B, L) batches: None for a global layer without padding,
    (B, 1, 1, L) keys-only for a global layer, (1, 1, L, L) band without padding, else
    (B, 1, L, L). Smaller masks let sdpa pick faster kernels."""
    mask = layout.attention_mask.bool()  # (B, L)
    seqlen = mask.shape[1]
    if half is None:
        if not layout.has_padding:
            return None
        # An all-padding row would leave its queries nothing to attend: open it instead.
        return (mask | ~mask.any(dim=-1, keepdim=True))[:, None, None, :]
    ones = torch.ones(seqlen, seqlen, dtype=torch.bool, device=mask.device)
    band = ones.triu(-half).tril(half)[None, None]  # (1, 1, L, L): |i - j| <= half
    if not layout.has_padding:
        return band
    sees = layout.cached(("sees", half), lambda: rows_with_keys(layout, half))  # (B, L)
    return (band & mask[:, None, None, :]) | ~sees[:, None, :, None]


def block_diagonal_mask(layout: Layout, half: int | None) -> torch.Tensor:
    """(1, 1, T, T) mask for unpadded tokens: same sequence (and within the window)."""
    seq = layout.seq_ids()
    allowed = seq[:, None] == seq[None, :]
    if half is not None:
        pos = layout.pos_in_seq()
        allowed = allowed & ((pos[:, None] - pos[None, :]).abs() <= half)
    return allowed[None, None]


def rows_with_keys(layout: Layout, half: int | None) -> torch.Tensor:
    """(B, L): True where a query of a padded batch has a real key to attend (within the
    window for a local layer). Real tokens always do (themselves); the other rows' attention
    output is zero."""
    valid = layout.attention_mask.bool()  # (B, L)
    if half is None:
        return valid.any(dim=-1, keepdim=True).expand_as(valid)
    seqlen = valid.shape[1]
    counts = F.pad(valid.int().cumsum(-1), (1, 0))  # (B, L + 1): real keys before each index
    idx = torch.arange(seqlen, device=valid.device)
    return counts[:, (idx + half + 1).clamp(max=seqlen)] > counts[:, (idx - half).clamp(min=0)]


def zero_rows_without_keys(out: torch.Tensor, layout: Layout, half: int | None) -> torch.Tensor:
    """(B, L, H, D) attention output of a padded batch with the rows that had no key zeroed."""
    if not layout.has_padding:
        return out
    sees = layout.cached(("sees", half), lambda: rows_with_keys(layout, half))
    return out.masked_fill(~sees[:, :, None, None], 0.0)
