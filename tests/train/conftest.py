"""Hydra composition helpers and a tiny, fast pretraining config for the training tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from flexbert.train import paths
from tests.train.finetune_helpers import (
    COLBERT,
    FAST,
    KEY,
    file_overrides,
    finetune_run,
    random_sentences,
    write_jsonl,
)

# ModernBERT's tokenizer: what `from_tokenizer` resolves to for a config-only check.
MODERNBERT_IDS = dict(
    vocab_size=50368,
    pad_token_id=50283,
    cls_token_id=50281,
    sep_token_id=50282,
    mask_token_id=50284,
)

# A few seconds of CPU: 150 KB of stdlib, a 512-token BPE, 64-token rows, 2 x 4-row microbatches.
TINY_RUN = [
    "data.corpus.max_bytes=150000",
    "data.tokenizer.vocab_size=512",
    "data.tokenizer.num_unused=4",
    "data.seq_len=64",
    "data.batch_size=8",
    "data.micro_batch_size=4",
    "data.eval_micro_batch_size=8",
    "data.mds.val_fraction=0.05",
    "data.buffer_size=32",
    "data.progress=false",
    "callbacks.batch_size_warmup.start_batch_size=4",
    "callbacks.batch_size_warmup.warmup_tokens=600",
    "callbacks.speed_monitor=null",
    "trainer.max_duration=6ba",
    "trainer.eval_interval=6ba",
    "trainer.eval_subset_num_batches=2",
    "trainer.save_interval=3ba",
    "trainer.save_num_checkpoints_to_keep=-1",
    "trainer.progress_bar=false",
    "model.attention_pattern.window=16",
]


# A 2-batch run that evaluates once and exports nothing: for tests about one behaviour.
SHORT_RUN = [
    "trainer.max_duration=2ba",
    "trainer.eval_interval=2ba",
    "callbacks.batch_size_warmup=null",
    "export_hf=false",
]


def compose_config(overrides: list[str] | None = None, return_hydra: bool = False) -> DictConfig:
    """Compose conf/pretrain.yaml (plus experiments/ablations) the way flexbert-train does."""
    return paths.compose_config("pretrain", overrides or [], return_hydra_config=return_hydra)


@pytest.fixture
def tiny_run_config(tmp_path):
    def make(*extra: str) -> DictConfig:
        return compose_config([*TINY_RUN, f"paths.cache_dir={tmp_path / 'cache'}", *extra])

    return make


@pytest.fixture(scope="session")
def first_run(tmp_path_factory):
    """One 6-batch run (checkpoints at batches 3 and 6), shared by the pretraining tests."""
    from flexbert.train.pretrain import train

    root = tmp_path_factory.mktemp("pretrain")
    cfg = compose_config([*TINY_RUN, f"paths.cache_dir={root / 'cache'}"])
    summary = train(cfg, root / "run")
    return root, cfg, summary


@pytest.fixture(autouse=True)
def _clean_streaming_shm():
    """Streaming keeps per-dataset state in shared memory; drop leftovers between tests."""
    yield
    from streaming.base.util import clean_stale_shared_memory

    from flexbert.data.streaming_lifecycle import stop_streaming

    stop_streaming()  # datasets a test opened outside flexbert-train's own clean-up
    clean_stale_shared_memory()


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """Every case of tests/train/two_rank_worker.py, from one two-process launch:
    `two_ranks(case)` is the list of what each rank saved, rank 0 first."""
    from pathlib import Path

    import torch

    from tests.conftest import launch_two_ranks

    out = tmp_path_factory.mktemp("two_ranks")
    launch_two_ranks(Path(__file__).with_name("two_rank_worker.py"), str(out))

    def results(case: str) -> list:
        return [torch.load(path) for path in sorted((out / case).glob("rank*.pt"))]

    return results


def assert_every_rank_took_this_step(results: list, loss, model) -> None:
    """Each of the two ranks' saved DDP-averaged steps (`two_ranks(case)`) equals `loss` and
    the gradient of layer 1's MLP input weight of `model`, one process with the whole batch."""
    import torch

    assert len(results) == 2
    for rank in results:
        torch.testing.assert_close(rank["loss"], loss.detach())
        torch.testing.assert_close(rank["grad"], model.model.layers[1].mlp.Wi.weight.grad)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """A tiny randomly initialised encoder + its tokenizer, saved like a pretraining export."""
    from flexbert import FlexBertForMaskedLM, ModelConfig
    from flexbert.data.tokenizer import save_tokenizer, special_token_ids, train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(s) for s in random_sentences(rng, 300)]
    tok = train_tokenizer(texts, vocab_size=384, num_unused=4, min_frequency=1)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", **special_token_ids(tok))
    out = tmp_path_factory.mktemp("pretrained") / "hf"
    FlexBertForMaskedLM(cfg).save_hf(out)
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def contains_word(tmp_path_factory) -> dict[str, Path]:
    """CSV train/dev sets: label 1 when the text contains KEY (learnable, 50/50)."""
    import csv

    rng, root = random.Random(1), tmp_path_factory.mktemp("cls")
    files = {}
    for split, n in (("train", 320), ("validation", 128)):
        files[split] = root / f"{split}.csv"
        with files[split].open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for s in random_sentences(rng, n):
                w.writerow([" ".join(s), int(KEY in s)])
    return files


@pytest.fixture(scope="session")
def colbert_pairs(tmp_path_factory) -> dict[str, Path]:
    """JSONL query/positive pairs: each positive is its query's words reversed."""
    rng, root = random.Random(4), tmp_path_factory.mktemp("colbert_data")
    files = {}
    for split, n in (("train", 96), ("validation", 32)):
        rows = [
            {"query": " ".join(s), "positive": " ".join(s[::-1])} for s in random_sentences(rng, n)
        ]
        files[split] = write_jsonl(root / f"{split}.jsonl", rows)
    return files


@pytest.fixture(scope="session")
def colbert_run(pretrained, colbert_pairs, tmp_path_factory):
    """A tiny ColBERT fine-tuned from `pretrained` for 3 epochs: (run folder, summary)."""
    overrides = [f"model.path={pretrained}", *COLBERT, *file_overrides(colbert_pairs), *FAST]
    return finetune_run(
        [*overrides, "trainer.max_duration=3ep"], tmp_path_factory.mktemp("colbert")
    )
