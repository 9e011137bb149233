"""Composer DataSpec for FlexBERT batches, so sample and token counts are right when packed.

A batch is one microbatch (padded or packed), or an optimizer step built by
`flexbert.train.batching.StepBatcher`: `{"microbatches": [...]}`, counted as the sum of its
parts and split back into exactly those parts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from composer.core import DataSpec
from composer.core.data_spec import default_split_batch

from flexbert.data.masking import label_positions
from flexbert.heads import IGNORE_INDEX

STEP_KEY = "microbatches"


def num_samples(batch: dict[str, Any]) -> int:
    if STEP_KEY in batch:
        return sum(num_samples(m) for m in batch[STEP_KEY])
    if "cu_seqlens" in batch:
        return int(batch["cu_seqlens"].shape[0] - 1)
    return int(batch["input_ids"].shape[0])


def num_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens in the batch."""
    if STEP_KEY in batch:
        return sum(num_tokens(m) for m in batch[STEP_KEY])
    if "cu_seqlens" in batch:  # packed: every token listed (no device sync to count them)
        return int(batch["input_ids"].shape[0])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def num_label_tokens(batch: dict[str, Any]) -> int:
    """Tokens that carry an MLM label: what the loss averages over."""
    if STEP_KEY in batch:
        return sum(num_label_tokens(m) for m in batch[STEP_KEY])
    if "label_positions" in batch:  # its length: no device sync when the batch is on a GPU
        return int(batch["label_positions"].shape[0])
    if "labels" not in batch:
        return num_tokens(batch)
    return int((batch["labels"] != IGNORE_INDEX).sum())


def token_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Composer's two token counts: all real tokens, and the loss-generating (labelled) ones.

    With `accumulate_train_batch_on_tokens=True` Composer weights each microbatch's mean loss
    by its labelled tokens, so a step's loss is the mean over all its masked tokens. A
    retrieval batch's positives and hard negatives (`cand_mask`, `neg_mask`) count in the
    total: the model encodes them too.
    """
    total = num_tokens(batch)
    for key in ("cand_mask", "neg_mask"):
        if key in batch:
            total += int(batch[key].sum())
    return {"total": total, "loss_generating": num_label_tokens(batch)}


def split_batch(batch: dict[str, Any], microbatch_size: int | float | None) -> list[dict[str, Any]]:
    """Split into microbatches of `microbatch_size` sequences (packed batches by cu_seqlens).

    A step batch from StepBatcher is returned as its own microbatches. Each part's
    `label_positions` are found again from its own labels.
    """
    if STEP_KEY in batch:
        return list(batch[STEP_KEY])
    parts = _split(batch, microbatch_size)
    if "label_positions" in batch:
        for part in parts:
            if part is not batch:
                part["label_positions"] = label_positions(part["labels"])
    return parts


def _split(batch: dict[str, Any], microbatch_size: int | float | None) -> list[dict[str, Any]]:
    if microbatch_size is None:
        return [batch]
    if "cu_seqlens" not in batch:
        rest = {k: v for k, v in batch.items() if k != "label_positions"}
        return default_split_batch(rest, microbatch_size)
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
        per_token = ("input_ids", "labels", "cu_seqlens", "label_positions", "stream_ids")
        part = {k: v for k, v in batch.items() if k not in per_token}
        for key in ("input_ids", "labels", "stream_ids"):
            if key in batch:
                part[key] = batch[key][start:stop]
        part["cu_seqlens"] = cu[first : last + 1] - start
        lengths = [b - a for a, b in zip(bounds[first:last], bounds[first + 1 : last + 1])]
        part["max_seqlen"] = max(lengths)
        out.append(part)
    return out


def flexbert_data_spec(
    dataloader: Iterable, whole_batches: bool = False, **kwargs: Any
) -> DataSpec:
    """DataSpec with FlexBERT's sample/token counts and packed-aware splitting.
    `whole_batches`: the loader yields microbatches already (pretraining's evaluation: rows
    per rank), which Composer must not split again by their document count."""
    return DataSpec(
        dataloader,
        get_num_samples_in_batch=num_samples,
        get_num_tokens_in_batch=token_counts,
        split_batch=_as_one_microbatch if whole_batches else split_batch,
        **kwargs,
    )


def _as_one_microbatch(batch: dict[str, Any], microbatch_size: Any) -> list[dict[str, Any]]:
    return [batch]
