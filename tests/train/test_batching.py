"""Optimizer steps from whole microbatches, batch-size warmup, and resumption of both."""

from __future__ import annotations

import pytest
import torch

from flexbert.train.batching import BatchSizeSchedule, StepBatcher
from flexbert.train.data_spec import num_samples, num_tokens, split_batch, token_counts


def test_schedule_ramps_linearly_in_tokens_then_stays_full():
    s = BatchSizeSchedule(start=768, full=4608, warmup_tokens=50_000)
    assert s.rows(0) == 768 and s.rows(25_000) == 768 + (4608 - 768) // 2
    assert s.rows(50_000) == s.rows(10**9) == 4608
    assert s.microbatches(0, 96) == 8 and s.microbatches(10**9, 96) == 48
    assert BatchSizeSchedule(8, 8, 0).rows(0) == 8
    with pytest.raises(ValueError, match="start"):
        BatchSizeSchedule(16, 8, 10)


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
    batcher = StepBatcher(_Micro(12), rows_per_step=4, rows_per_microbatch=1)
    batcher.set_schedule(start_rows=1, warmup_tokens=60)
    # 0 tokens: 1 row; 10: 1.5 -> 1; 20: 2; 40: 3; 70: full 4; the last step takes what is left
    assert _sizes(batcher) == [1, 1, 2, 3, 4, 1]
    assert batcher.tokens_seen == 120


def test_step_batches_count_and_split_into_their_microbatches():
    step = next(iter(StepBatcher(_Micro(4), rows_per_step=2, rows_per_microbatch=1)))
    assert num_samples(step) == 4 and num_tokens(step) == 20
    assert token_counts(step) == {"total": 20, "loss_generating": 6}
    parts = split_batch(step, 1)
    assert [int(p["input_ids"][0]) for p in parts] == [0, 1]


def test_step_batcher_resumes_at_the_same_step_and_batch_size():
    def run(start=None):
        batcher = StepBatcher(_Micro(12), rows_per_step=4, rows_per_microbatch=1)
        batcher.set_schedule(1, 60)
        if start is not None:
            batcher.load_state_dict(start)
        return batcher

    full = run()
    it = iter(full)
    first = [next(it) for _ in range(3)]
    state = full.dataset.state_dict(num_samples=123, from_beginning=True)  # as Composer calls it
    rest = [[int(m["input_ids"][0]) for m in s["microbatches"]] for s in it]
    resumed = [[int(m["input_ids"][0]) for m in s["microbatches"]] for s in run(state)]
    assert len(first) == 3 and resumed == rest == [[4, 5, 6], [7, 8, 9, 10], [11]]
