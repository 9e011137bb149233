"""Shared fixtures: deterministic seeds and small ragged batches."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ragged_batch(lengths: list[int], vocab: int = 512, low: int = 4, seed: int = 0):
    """Right-padded (B, L) ids and bool mask for sequences of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    seqlen = max(lengths)
    ids = torch.randint(low, vocab, (len(lengths), seqlen), generator=gen)
    mask = torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]
    ids = ids.masked_fill(~mask, 0)
    return ids, mask


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
