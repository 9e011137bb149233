"""Optimizer-step batches made of whole microbatches, with a batch-size warmup schedule.

The data loaders (packed or padded) yield microbatches of a fixed number of rows (a packed row
holds `seq_len` token slots; a padded row is one document). `StepBatcher` groups consecutive
microbatches into one optimizer step: `{"microbatches": [mb, ...]}`, which
`flexbert.train.data_spec.split_batch` hands back to Composer unchanged, so gradient
accumulation runs over exactly the microbatches the packer built.

Batch-size warmup (ModernBERT: 768 -> 4608 sequences over the first 50B tokens) changes how
many microbatches form a step. As ModernBERT's scheduler does, every size of the ramp (in
whole microbatches) lasts the same number of optimizer steps, so the tokens spent at a size grow
with it and all sizes together take the warmup's tokens (counted as rows x seq_len, the token
slots of a packed row). `BatchSizeSchedule` maps the step count to a size: a function of the
step alone, so every rank takes the same number of microbatches at every step (the real tokens
of a rank's batches differ, and ranks stepping differently would wait on each other forever),
and a resumed run, whose step count lives in the loader's state, rebuilds exactly the same
steps. `flexbert.train.callbacks.BatchSizeWarmup` attaches a schedule at fit start and logs the
current batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from flexbert.registry import ConfigError
from flexbert.train.data_spec import num_tokens


@dataclass(frozen=True)
class BatchSizeSchedule:
    """Microbatches per optimizer step: each size from `start` up to `full` - 1 for
    `steps_per_size` steps (a fraction: some sizes then take no step), then `full`."""

    start: int
    full: int
    steps_per_size: float

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.full:
            raise ConfigError(f"need 1 <= start <= full, got start={self.start}, full={self.full}")
        if self.steps_per_size < 0:
            raise ConfigError(f"steps_per_size must be >= 0, got {self.steps_per_size}")

    @classmethod
    def over_tokens(
        cls,
        start_rows: int,
        full_rows: int,
        rows_per_microbatch: int,
        warmup_tokens: int,
        tokens_per_row: int,
    ) -> BatchSizeSchedule:
        """From `start_rows` (rounded up to whole microbatches) to `full_rows` rows per step,
        every size the same number of steps, `warmup_tokens` in all (rows x tokens_per_row)."""
        if warmup_tokens < 0:
            raise ConfigError(f"warmup_tokens must be >= 0, got {warmup_tokens}")
        full = full_rows // rows_per_microbatch
        start = min(full, max(1, math.ceil(start_rows / rows_per_microbatch)))
        one_step_each = sum(range(start, full)) * rows_per_microbatch * tokens_per_row
        return cls(start, full, warmup_tokens / one_step_each if one_step_each else 0.0)

    @property
    def warmup_steps(self) -> int:
        """Steps before the full size."""
        return math.ceil(self.steps_per_size * (self.full - self.start))

    def microbatches(self, step: int) -> int:
        """Microbatches of optimizer step `step` (counted from 0)."""
        if step >= self.warmup_steps:
            return self.full
        return self.start + int(step / self.steps_per_size)


class StepBatcher(IterableDataset):
    """Group a microbatch loader's output into optimizer steps of `rows_per_step` rows.

    The loader's own `state_dict()` / `load_state_dict()` (PackedMLMLoader,
    StreamingDataLoader) are saved with the step counters; Composer checkpoints them when it
    is handed `step_loader(batcher)`, and a resumed run continues from them. `rows_per_step` and
    `rows_per_microbatch` are per rank; `tokens_per_row` (seq_len) sizes the warmup. The last
    step of an epoch may hold fewer microbatches.
    """

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        rows_per_step: int,
        rows_per_microbatch: int,
        tokens_per_row: int,
    ):
        if rows_per_step % rows_per_microbatch:
            raise ConfigError(
                f"rows per step ({rows_per_step}) must be a multiple of rows per microbatch "
                f"({rows_per_microbatch}), per rank: set data.batch_size to a multiple of "
                "data.micro_batch_size"
            )
        self.loader = loader
        self.rows_per_microbatch = rows_per_microbatch
        self.rows_per_step, self.tokens_per_row = rows_per_step, tokens_per_row
        full = rows_per_step // rows_per_microbatch
        self.schedule = BatchSizeSchedule(full, full, 0.0)
        self.tokens_seen = 0
        self.steps = 0
        self.last_microbatches = 0

    def set_schedule(self, start_rows: int, warmup_tokens: int) -> BatchSizeSchedule:
        """Ramp from `start_rows` rows per step to the full size over `warmup_tokens` tokens
        (rows x tokens_per_row), each size the same number of steps."""
        self.schedule = BatchSizeSchedule.over_tokens(
            start_rows,
            self.rows_per_step,
            self.rows_per_microbatch,
            warmup_tokens,
            self.tokens_per_row,
        )
        return self.schedule

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step: list[dict[str, Any]] = []
        for micro in self.loader:
            step.append(micro)
            if len(step) == self.schedule.microbatches(self.steps):
                yield self._emit(step)
                step = []
        if step:
            yield self._emit(step)

    def _emit(self, step: list[dict[str, Any]]) -> dict[str, Any]:
        self.tokens_seen += sum(num_tokens(m) for m in step)
        self.steps += 1
        self.last_microbatches = len(step)
        return {"microbatches": step}

    def state_dict(self, num_samples: int = 0, from_beginning: bool = True) -> dict[str, Any]:
        """Step counters and the loader's state. Composer's call passes its sample count,
        which is ignored: a step of packed rows holds no fixed number of documents."""
        has_state = hasattr(self.loader, "state_dict")
        return {
            "tokens_seen": self.tokens_seen,
            "steps": self.steps,
            "loader": self.loader.state_dict() if has_state else None,  # type: ignore[attr-defined]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens_seen = int(state["tokens_seen"])
        self.steps = int(state["steps"])
        if state.get("loader") is not None and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(state["loader"])  # type: ignore[attr-defined]


def _as_is(step: dict[str, Any]) -> dict[str, Any]:
    return step


def step_loader(batcher: StepBatcher) -> DataLoader:
    """The train loader to hand Composer: a torch DataLoader over `batcher` that passes each
    step through as is. Composer saves and restores the dataset state only of a DataLoader's
    dataset; from anything else it resumes by replaying every batch of the epoch so far."""
    return DataLoader(batcher, batch_size=None, collate_fn=_as_is)
