"""FlexBERT's own Composer callbacks: batch-size warmup and a per-step loss record."""

from __future__ import annotations

from typing import Any

from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger

from flexbert.registry import ConfigError
from flexbert.train.batching import StepBatcher


def _step_batcher(state: State) -> StepBatcher | None:
    loader = state.train_dataloader
    loader = getattr(loader, "dataloader", loader)  # a DataSpec wraps the loader
    loader = getattr(loader, "dataset", loader)  # step_loader: a DataLoader over the batcher
    return loader if isinstance(loader, StepBatcher) else None


class BatchSizeWarmup(Callback):
    """Ramp the sequences per optimizer step from `start_batch_size` to the full batch size.

    The full size is the data config's `batch_size`; every size of the ramp, in whole
    microbatches, lasts the same number of steps, and the ramp takes `warmup_tokens` (counted
    as rows x `seq_len`; see `flexbert.train.batching`). The step batcher applies the
    schedule, so it survives resumption; this callback attaches it and logs `batch_size/rows`.
    `start_batch_size` and `warmup_tokens` count all ranks together, like `batch_size`.
    """

    def __init__(self, start_batch_size: int, warmup_tokens: int | str) -> None:
        self.start_batch_size = int(start_batch_size)
        self.warmup_tokens = _token_count("warmup_tokens", warmup_tokens)
        self.world_size = 1

    def fit_start(self, state: State, logger: Logger) -> None:
        batcher = _step_batcher(state)
        if batcher is None:
            raise ConfigError(
                "BatchSizeWarmup needs the train loader to be a StepBatcher (flexbert-train's "
                "packed pretraining loader); drop it with callbacks.batch_size_warmup=null"
            )
        from composer.utils import dist

        self.world_size = dist.get_world_size()
        batcher.set_schedule(
            max(1, self.start_batch_size // self.world_size), self.warmup_tokens // self.world_size
        )

    def batch_end(self, state: State, logger: Logger) -> None:
        batcher = _step_batcher(state)
        if batcher is not None:
            rows = batcher.last_microbatches * batcher.rows_per_microbatch * self.world_size
            logger.log_metrics({"batch_size/rows": rows})


def _token_count(name: str, value: int | str) -> int:
    """A number of tokens: 100000, "5e10" (as YAML may give it) or a Composer duration in
    tokens ("50000000000tok", as t_warmup is written)."""
    try:
        count = int(float(value))
    except (TypeError, ValueError):
        try:
            time = Time.from_input(value, TimeUnit.TOKEN)
        except (TypeError, ValueError):
            time = None
        if time is None or time.unit != TimeUnit.TOKEN:
            raise ConfigError(
                f"callbacks.batch_size_warmup.{name}={value!r} is not a number of tokens: give "
                "a count (50000000000, 5e10) or tokens as a duration (50000000000tok)"
            ) from None
        count = int(time.value)
    return count


class LossHistory(Callback):
    """Keep (batch, tokens, train loss) for every step: the loss curve in summary.json; and
    when the last evaluation ran, so a run evaluates its final weights once."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.last_eval_batch: int | None = None  # the batch count at the latest evaluation

    def eval_end(self, state: State, logger: Logger) -> None:
        self.last_eval_batch = int(state.timestamp.batch)

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = state.total_loss_dict.get("loss/train/total")
        if loss is None:
            return
        self.steps.append(
            {
                "batch": int(state.timestamp.batch),
                "tokens": int(state.timestamp.token),
                "loss": float(loss),
            }
        )
