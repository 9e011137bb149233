"""Shared fixtures for the data tests: one small tokenizer and one small MDS conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexbert.data.corpus import CorpusSpec

SMALL_CORPUS = CorpusSpec(source="stdlib", max_bytes=120_000)


@pytest.fixture(scope="session")
def tokenizer():
    from flexbert.data.tokenizer import train_tokenizer

    return train_tokenizer(SMALL_CORPUS.texts(), vocab_size=512, num_unused=4)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    from flexbert.data.tokenizer import save_tokenizer

    return save_tokenizer(tokenizer, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def mds_dir(tokenizer, tmp_path_factory) -> Path:
    from flexbert.data.mds import prepare_mds

    out = tmp_path_factory.mktemp("mds") / "shards"
    prepare_mds(
        SMALL_CORPUS,
        out,
        tokenizer,
        max_length=64,
        val_fraction=0.2,
        progress=False,
        size_limit=1 << 14,
    )
    return out


@pytest.fixture(autouse=True)
def _clean_streaming_shm():
    """Streaming keeps per-dataset state in shared memory; drop leftovers between tests."""
    yield
    from streaming.base.util import clean_stale_shared_memory

    from flexbert.data.streaming_lifecycle import stop_streaming

    stop_streaming()  # datasets a test opened outside flexbert-train's own clean-up
    clean_stale_shared_memory()
