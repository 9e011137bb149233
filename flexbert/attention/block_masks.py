"""FlexAttention block masks, built once per forward from the batch layout.

`create_block_mask` evaluates the mask function on every (query, key) pair: T^2 calls, 35-75 ms
per mask at 64k packed tokens on an H100 uncompiled. For packed (unpadded) batches the block
structure follows from `cu_seqlens` alone: packed sequences are contiguous, so a query block and
a key block share a sequence exactly when their ranges of sequence ids overlap, and the closest
pair of a shared sequence is the end of one block and the start of the other. That gives the
partial and full blocks in O(num_blocks^2) with a few tensor ops (no host sync), identical to
what `create_block_mask` finds; the mask function still resolves partial blocks token by token.
"""

from __future__ import annotations

import torch

from flexbert.layout import Layout

BLOCK_SIZE = 128  # FlexAttention's default sparse block size


def padded_block_mask(layout: Layout, half: int | None):
    """(B, L) batches: keys must be real tokens within the window, for padding queries too
    (as `padded_mask`); FlexAttention gives a query with no such key a zero output."""
    from torch.nn.attention.flex_attention import create_block_mask

    valid = layout.attention_mask.bool()
    batch, seqlen = valid.shape

    def mask_mod(b, h, q_idx, kv_idx):
        keep = valid[b, kv_idx]
        if half is not None:
            keep = keep & ((q_idx - kv_idx).abs() <= half)
        return keep

    return create_block_mask(mask_mod, batch, None, seqlen, seqlen, device=valid.device)


def packed_block_mask(layout: Layout, half: int | None, block: int = BLOCK_SIZE):
    """Unpadded tokens: attend within the same sequence (and within the window)."""
    from torch.nn.attention.flex_attention import BlockMask

    seq, pos = layout.seq_ids(), layout.pos_in_seq()
    total = seq.shape[0]
    partial, full = packed_block_structure(seq, half, block)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = seq[q_idx] == seq[kv_idx]
        if half is not None:
            keep = keep & ((pos[q_idx] - pos[kv_idx]).abs() <= half)
        return keep

    kv_num, kv_indices = _ordered(partial)
    full_num, full_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_indices, full_num, full_indices, block, mask_mod, (total, total)
    )


def packed_block_structure(
    seq: torch.Tensor, half: int | None, block: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, n) bool: (query block, key block) pairs that are partial / full, n = ceil(T / block).

    `seq` is the (T,) non-decreasing sequence id of every token. A block is full when every
    pair in it may attend (so the kernel skips the mask function), partial when some may."""
    total = seq.shape[0]
    starts = torch.arange(0, total, block, device=seq.device)  # (n,) first token of each block
    ends = (starts + block).clamp(max=total) - 1  # (n,) last token
    first, last = seq[starts], seq[ends]  # sequence ids at each block's two ends
    q_first, q_last = first[:, None], last[:, None]  # rows: query blocks
    k_first, k_last = first[None, :], last[None, :]  # columns: key blocks
    shared = (q_first <= k_last) & (k_first <= q_last)  # (n, n) the id ranges overlap
    whole = ((ends - starts + 1) == block) & (first == last)  # a complete block of one sequence
    full = whole[:, None] & whole[None, :] & (q_first == k_first)
    if half is not None:
        q_start, q_end = starts[:, None], ends[:, None]
        k_start, k_end = starts[None, :], ends[None, :]
        # The closest (query, key) pair of a shared sequence straddles the blocks' facing ends.
        shared &= (k_start - q_end <= half) & (q_start - k_end <= half)
        full &= torch.maximum(k_end - q_start, q_end - k_start) <= half
    return shared & ~full, full


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, n) bool -> (1, 1, n) counts and (1, 1, n, n) int32 column indices, listed first."""
    as_int = blocks.to(torch.int32)
    indices = torch.argsort(as_int, dim=-1, descending=True, stable=True)
    return as_int.sum(-1)[None, None].to(torch.int32), indices[None, None].to(torch.int32)
