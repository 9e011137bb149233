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


def offline_hub(monkeypatch, tmp_path):
    """An offline Hugging Face cache under tmp_path: Hub ids resolve from it, never the network."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_hub_repo(cache, repo_id: str, files_from) -> None:
    """Lay out `files_from`'s files as the cached snapshot of `repo_id` at main."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)
