"""Optimizer steps from whole microbatches, batch-size warmup, and resumption of both."""

from __future__ import annotations

import pytest
import torch
from composer.core import DataSpec, State

from flexbert.train.batching import BatchSizeSchedule, StepBatcher, step_loader
from flexbert.train.data_spec import num_samples, num_tokens, split_batch, token_counts
from flexbert.train.paths import overlay_dir
from flexbert.train.runtime import rows_per_rank
from tests.train.conftest import compose_config

EXPERIMENTS = sorted(p.stem for p in overlay_dir("experiment").glob("*.yaml"))


def test_every_warmup_size_lasts_the_same_steps_and_all_take_the_warmup_tokens():
    """ModernBERT-base's ramp on one rank: 768 -> 4608 rows in microbatches of 96, 50B tokens
    of 1024-token rows: each size (8 .. 47 microbatches) about 462 steps, then 48."""
    s = BatchSizeSchedule.over_tokens(768, 4608, 96, 50_000_000_000, 1024)
    sizes = [s.microbatches(step) for step in range(s.warmup_steps + 100)]
    assert sizes[0] == 8 and sizes[-1] == 48 and sizes == sorted(sizes)
    steps_at = [sizes.count(m) for m in range(8, 48)]
    assert max(steps_at) - min(steps_at) <= 1 and 455 <= min(steps_at) <= 463
    tokens = sum(m * 96 * 1024 for m in sizes[: s.warmup_steps])
    assert abs(tokens - 50_000_000_000) <= 48 * 96 * 1024  # within one step
    assert BatchSizeSchedule.over_tokens(8, 8, 1, 0, 10).microbatches(0) == 8
    assert BatchSizeSchedule.over_tokens(8, 16, 4, 0, 10).microbatches(0) == 4  # no warmup
    with pytest.raises(ValueError, match="start"):
        BatchSizeSchedule(16, 8, 1.0)


class _Micro:
    """A resumable stand-in for PackedMLMLoader: packed microbatches of 10 tokens each."""

    def __init__(self, n: int) -> None:
        self.n, self.pos = n, 0

    def __iter__(self):
        while self.pos < self.n:
            i = self.pos
            self.pos += 1
            ids = torch.full((10,), i)
            yield {
                "input_ids": ids,
                "labels": torch.where(torch.arange(10) < 3, ids, -100),
                "cu_seqlens": torch.tensor([0, 4, 10], dtype=torch.int32),
                "max_seqlen": 6,
            }

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def _sizes(batcher):
    return [len(step["microbatches"]) for step in batcher]


def test_step_batcher_follows_the_warmup_schedule():
    batcher = StepBatcher(_Micro(12), rows_per_step=4, rows_per_microbatch=1, tokens_per_row=10)
    batcher.set_schedule(start_rows=1, warmup_tokens=120)
    # sizes 1, 2, 3 take 60 tokens one step each: two steps each, then full; the last step
    # takes what is left
    assert _sizes(batcher) == [1, 1, 2, 2, 3, 3]
    assert batcher.tokens_seen == 120


class _Ragged(_Micro):
    """Microbatches whose real tokens differ (as on two ranks): 10 slots, `real` of them."""

    def __init__(self, n: int, real: list[int]) -> None:
        super().__init__(n)
        self.real = real

    def __iter__(self):
        for i, micro in enumerate(super().__iter__()):
            cut = self.real[i % len(self.real)]
            micro["cu_seqlens"] = torch.tensor([0, cut], dtype=torch.int32)
            micro["input_ids"] = micro["input_ids"][:cut]
            micro["labels"] = micro["labels"][:cut]
            yield micro


def test_ranks_with_different_real_tokens_take_the_same_steps():
    """The schedule follows the step count, not the tokens a rank happened to read: ranks
    that step differently would wait on each other's collectives forever."""
    sizes = []
    for real in ([10], [3, 9, 1], [2]):
        batcher = StepBatcher(_Ragged(40, real), 4, 1, tokens_per_row=10)
        batcher.set_schedule(start_rows=1, warmup_tokens=120)
        sizes.append(_sizes(batcher))
    assert sizes[0] == sizes[1] == sizes[2] == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4]


def test_step_batches_count_and_split_into_their_microbatches():
    step = next(
        iter(StepBatcher(_Micro(4), rows_per_step=2, rows_per_microbatch=1, tokens_per_row=10))
    )
    assert num_samples(step) == 4 and num_tokens(step) == 20
    assert token_counts(step) == {"total": 20, "loss_generating": 6}
    parts = split_batch(step, 1)
    assert [int(p["input_ids"][0]) for p in parts] == [0, 1]


def test_step_batcher_resumes_at_the_same_step_and_batch_size():
    def run(start=None):
        batcher = StepBatcher(_Micro(12), 4, 1, tokens_per_row=10)
        batcher.set_schedule(1, 120)
        if start is not None:
            batcher.load_state_dict(start)
        return batcher

    full = run()
    loader = step_loader(full)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    # Composer finds the state to checkpoint only through a DataLoader's dataset
    dataset = State._dataset_of(None, DataSpec(loader))  # type: ignore[arg-type]
    assert dataset is full
    state = dataset.state_dict(num_samples=123, from_beginning=True)  # as Composer calls it
    rest = [[int(m["input_ids"][0]) for m in s["microbatches"]] for s in it]
    resumed = [[int(m["input_ids"][0]) for m in s["microbatches"]] for s in run(state)]
    assert len(first) == 3 and resumed == rest == [[4, 5], [6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_shares_its_batches_on_one_eight_gpu_node(name):
    """Batch sizes count all ranks: the paper's node of 8 GPUs splits every one evenly into
    whole microbatches (the reference's per-GPU microbatch, times 8)."""
    data = compose_config([f"experiment={name}"]).data
    micro = rows_per_rank(data.micro_batch_size, "micro_batch_size", 8)
    step = rows_per_rank(data.batch_size, "batch_size", 8)
    rows_per_rank(data.eval_micro_batch_size, "eval_micro_batch_size", 8)
    assert step % micro == 0
    warmup = compose_config([f"experiment={name}"]).callbacks.get("batch_size_warmup")
    if warmup:  # the ramp starts at a whole number of microbatches
        assert warmup.start_batch_size % data.micro_batch_size == 0
        BatchSizeSchedule.over_tokens(warmup.start_batch_size // 8, step, micro, 10**9, 1024)


def test_pretraining_eval_batches_are_not_split_again_by_document_count():
    """The packed eval loader yields each rank's rows already; Composer's eval microbatch
    size (rows) must not cut them again into groups of that many documents."""
    from flexbert.train.data_spec import flexbert_data_spec

    packed = {
        "input_ids": torch.arange(10),
        "labels": torch.full((10,), -100),
        "cu_seqlens": torch.tensor([0, 3, 5, 9, 10], dtype=torch.int32),
        "max_seqlen": 4,
    }
    assert len(flexbert_data_spec([]).split_batch(packed, 2)) == 2  # 4 documents, 2 by 2
    assert flexbert_data_spec([], whole_batches=True).split_batch(packed, 2) == [packed]


@pytest.mark.parametrize(
    "given, tokens", [(600, 600), ("5e10", 50_000_000_000), ("50000000000tok", 50_000_000_000)]
)
def test_warmup_tokens_read_a_count_or_a_duration_in_tokens(given, tokens):
    from flexbert.train.callbacks import BatchSizeWarmup

    assert BatchSizeWarmup(8, given).warmup_tokens == tokens


@pytest.mark.parametrize("given", ["1000ba", "0.5dur", "many"])
def test_warmup_tokens_in_another_unit_is_refused_by_name(given):
    from flexbert import ConfigError
    from flexbert.train.callbacks import BatchSizeWarmup

    with pytest.raises(ConfigError, match=rf"warmup_tokens='{given}' is not a number of tokens"):
        BatchSizeWarmup(8, given)


def test_a_callback_config_error_reaches_the_user_unwrapped():
    """Hydra wraps what a target raises; run_app shows a ConfigError as one line only if it
    arrives as itself."""
    from omegaconf import OmegaConf

    from flexbert import ConfigError
    from flexbert.train.app import instantiate_all

    warmup = {"_target_": "flexbert.train.callbacks.BatchSizeWarmup", "start_batch_size": 8}
    node = OmegaConf.create({"ok": {**warmup, "warmup_tokens": 600}, "gone": None})
    assert [c.warmup_tokens for c in instantiate_all(node)] == [600]
    bad = OmegaConf.create({"batch_size_warmup": {**warmup, "warmup_tokens": "5ba"}})
    with pytest.raises(ConfigError, match="not a number of tokens") as caught:
        instantiate_all(bad)
    assert type(caught.value) is ConfigError
