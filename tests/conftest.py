"""Shared fixtures: deterministic seeds, small ragged batches, an offline Hub cache and a
two-process launcher (`launch_two_ranks`)."""

from __future__ import annotations

from pathlib import Path

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


def launch_two_ranks(worker: Path, *args: str) -> None:
    """The script `worker` on two gloo processes (torch.distributed.run), with `args`; a
    failure shows both processes' output."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(port), str(worker), *args]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
