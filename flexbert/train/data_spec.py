"""Composer DataSpec for FlexBERT batches, so sample and token counts are right when packed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from composer.core import DataSpec
from composer.core.data_spec import default_split_batch


def num_samples(batch: dict[str, Any]) -> int:
    if "cu_seqlens" in batch:
        return int(batch["cu_seqlens"].shape[0] - 1)
    return int(batch["input_ids"].shape[0])


def num_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens in the batch."""
    if "cu_seqlens" in batch:
        return int(batch["cu_seqlens"][-1])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def split_batch(batch: dict[str, Any], microbatch_size: int | float | None) -> list[dict[str, Any]]:
    """Split into microbatches of `microbatch_size` sequences (packed batches by cu_seqlens)."""
    if microbatch_size is None:
        return [batch]
    if "cu_seqlens" not in batch:
        return default_split_batch(batch, microbatch_size)
    size = int(microbatch_size)
    n = num_samples(batch)
    if size >= n:
        return [batch]
    cu = batch["cu_seqlens"]
    bounds = cu.tolist()
    out = []
    for first in range(0, n, size):
        last = min(first + size, n)
        start, stop = bounds[first], bounds[last]
        part = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "cu_seqlens")}
        part["input_ids"] = batch["input_ids"][start:stop]
        if "labels" in batch:
            part["labels"] = batch["labels"][start:stop]
        part["cu_seqlens"] = cu[first : last + 1] - start
        lengths = [b - a for a, b in zip(bounds[first:last], bounds[first + 1 : last + 1])]
        part["max_seqlen"] = max(lengths)
        out.append(part)
    return out


def flexbert_data_spec(dataloader: Iterable, **kwargs: Any) -> DataSpec:
    return DataSpec(
        dataloader,
        get_num_samples_in_batch=num_samples,
        get_num_tokens_in_batch=num_tokens,
        split_batch=split_batch,
        **kwargs,
    )
