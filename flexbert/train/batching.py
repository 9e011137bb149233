"""Optimizer-step batches made of whole microbatches, with a batch-size warmup schedule.

The data loaders (packed or padded) yield microbatches of a fixed number of rows (a packed row
holds `seq_len` token slots; a padded row is one document). `StepBatcher` groups consecutive
microbatches into one optimizer step: `{"microbatches": [mb, ...]}`, which
`flexbert.train.data_spec.split_batch` hands back to Composer unchanged, so gradient
accumulation runs over exactly the microbatches the packer built.

Batch-size warmup (ModernBERT: 768 -> 4608 sequences over the first 50B tokens) changes how
many microbatches form a step: `BatchSizeSchedule` maps the tokens this loader has produced so
far to a number of rows, rounded to whole microbatches. The count lives in the loader's state,
so a resumed run rebuilds exactly the same steps. `flexbert.train.callbacks.BatchSizeWarmup`
attaches a schedule at fit start and logs the current batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from flexbert.data.loader import ComposerStateAdapter
from flexbert.registry import ConfigError
from flexbert.train.data_spec import num_tokens


@dataclass(frozen=True)
class BatchSizeSchedule:
    """Rows (sequences) per step: linear from `start` to `full` over `warmup_tokens` tokens."""

    start: int
    full: int
    warmup_tokens: int

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.full:
            raise ConfigError(f"need 1 <= start <= full, got start={self.start}, full={self.full}")
        if self.warmup_tokens < 0:
            raise ConfigError(f"warmup_tokens must be >= 0, got {self.warmup_tokens}")

    def rows(self, tokens_seen: int) -> int:
        """Rows for the next step after `tokens_seen` tokens."""
        if self.warmup_tokens == 0 or tokens_seen >= self.warmup_tokens:
            return self.full
        frac = tokens_seen / self.warmup_tokens
        return int(self.start + frac * (self.full - self.start))

    def microbatches(self, tokens_seen: int, rows_per_microbatch: int) -> int:
        """Whole microbatches for the next step (at least one)."""
        return max(1, math.ceil(self.rows(tokens_seen) / rows_per_microbatch))


class StepBatcher:
    """Group a microbatch loader's output into optimizer steps of `rows_per_step` rows.

    The loader's own `state_dict()` / `load_state_dict()` (PackedMLMLoader,
    StreamingDataLoader) are saved with the step counters. `rows_per_step` and `rows_per_microbatch` are per rank. The last step of an epoch may hold
    fewer microbatches.
    """

    def __init__(
        self, loader: Iterable[dict[str, Any]], rows_per_step: int, rows_per_microbatch: int
    ):
        if rows_per_step % rows_per_microbatch:
            raise ConfigError(
                f"rows per step ({rows_per_step}) must be a multiple of rows per microbatch "
                f"({rows_per_microbatch})"
            )
        self.loader = loader
        self.rows_per_microbatch = rows_per_microbatch
        self.schedule = BatchSizeSchedule(rows_per_step, rows_per_step, 0)
        self.dataset = ComposerStateAdapter(self)
        self.tokens_seen = 0
        self.steps = 0
        self.last_microbatches = 0

    def set_schedule(self, start_rows: int, warmup_tokens: int) -> BatchSizeSchedule:
        """Ramp from `start_rows` rows per step to the full size over `warmup_tokens`."""
        self.schedule = BatchSizeSchedule(start_rows, self.schedule.full, warmup_tokens)
        return self.schedule

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step: list[dict[str, Any]] = []
        want = self.schedule.microbatches(self.tokens_seen, self.rows_per_microbatch)
        for micro in self.loader:
            step.append(micro)
            if len(step) == want:
                yield self._emit(step)
                step = []
                want = self.schedule.microbatches(self.tokens_seen, self.rows_per_microbatch)
        if step:
            yield self._emit(step)

    def _emit(self, step: list[dict[str, Any]]) -> dict[str, Any]:
        self.tokens_seen += sum(num_tokens(m) for m in step)
        self.steps += 1
        self.last_microbatches = len(step)
        return {"microbatches": step}

    def state_dict(self) -> dict[str, Any]:
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
