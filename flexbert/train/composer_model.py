"""Composer wrappers around FlexBERT heads.

Batches are dicts: either padded (`input_ids` (B, L), `attention_mask`) or packed
(`input_ids` (T,), `cu_seqlens`, `max_seqlen`), plus `labels` in the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, MaskedAccuracy
from composer.models import ComposerModel

from flexbert.flops import mlm_train_flops
from flexbert.heads import IGNORE_INDEX, FlexBertForMaskedLM
from flexbert.outputs import FlexBertOutput
from flexbert.train.data_spec import STEP_KEY, num_label_tokens

MODEL_INPUTS = ("input_ids", "attention_mask", "cu_seqlens", "max_seqlen", "labels")
MLM_INPUTS = (*MODEL_INPUTS, "label_positions")  # labelled tokens, found by the data loader


def model_inputs(batch: dict[str, Any], keys: tuple[str, ...] = MODEL_INPUTS) -> dict[str, Any]:
    inputs = {k: batch[k] for k in keys if k in batch}
    if isinstance(inputs.get("max_seqlen"), torch.Tensor):
        inputs["max_seqlen"] = int(inputs["max_seqlen"])
    return inputs


class FlexBertComposerModel(ComposerModel):
    """What every FlexBERT Composer wrapper shares: the loss comes from the head's output.

    Subclasses set `val_metrics` (and `train_metrics` where training metrics are wanted) and
    implement `update_metric`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train_metrics: dict[str, Any] = {}
        self.val_metrics: dict[str, Any] = {}

    input_keys = MODEL_INPUTS  # the batch entries the wrapped model's forward takes

    def forward(self, batch: dict[str, Any]) -> FlexBertOutput:
        return self.model(**model_inputs(batch, self.input_keys))

    def loss(self, outputs: FlexBertOutput, batch: dict[str, Any]) -> torch.Tensor:
        return outputs.loss

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> FlexBertOutput:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        return self.train_metrics if is_train else self.val_metrics


class ComposerFlexBertMLM(FlexBertComposerModel):
    """Masked-LM pretraining: loss from the model, masked accuracy and cross-entropy metrics."""

    input_keys = MLM_INPUTS

    def __init__(self, model: FlexBertForMaskedLM, stream_names: Sequence[str] = ()) -> None:
        """`stream_names`: also evaluate each source of a mixture on its own tokens
        ("MaskedAccuracy/web", ...; batches then carry per-token `stream_ids`)."""
        super().__init__(model)
        self.train_metrics = {"MaskedAccuracy": MaskedAccuracy(ignore_index=IGNORE_INDEX)}
        self.val_metrics = {
            "MaskedAccuracy": MaskedAccuracy(ignore_index=IGNORE_INDEX),
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
        }
        for index, name in enumerate(stream_names):
            for metric in (MaskedAccuracy, LanguageCrossEntropy):
                m = metric(ignore_index=IGNORE_INDEX)
                m.stream_index = index  # an attribute: Composer deep-copies eval metrics
                self.val_metrics[f"{metric.__name__}/{name}"] = m

    def flops_per_batch(self, batch: dict[str, Any]) -> float:
        """Training FLOPs of a (host-side) batch, for Composer's SpeedMonitor: flops/s and,
        on a GPU it knows, MFU. Counts the tokens of every sequence (padded batches: the real
        ones; packed: all of cu_seqlens, with pad_to_capacity its filler too), attention per
        sequence, and the head over the masked tokens with sparse prediction (all otherwise)."""
        if STEP_KEY in batch:
            return sum(self.flops_per_batch(b) for b in batch[STEP_KEY])
        if "cu_seqlens" in batch:
            bounds = batch["cu_seqlens"].tolist()
            lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        else:
            lengths = batch["attention_mask"].sum(dim=1).tolist()
        config = self.model.config
        decoded = num_label_tokens(batch) if config.sparse_prediction else sum(lengths)
        return mlm_train_flops(config, lengths, decoded)

    def update_metric(self, batch: dict[str, Any], outputs: FlexBertOutput, metric) -> None:
        labels = batch["labels"]
        logits = outputs.logits
        streams = batch.get("stream_ids")
        if logits.shape[0] != labels.numel() and logits.dim() == 2:  # sparse prediction
            if "label_positions" in batch:
                chosen = batch["label_positions"]
            else:
                chosen = (labels.flatten() != IGNORE_INDEX).nonzero().flatten()
            labels = labels.flatten().index_select(0, chosen)
            streams = None if streams is None else streams.flatten().index_select(0, chosen)
            if labels.numel() == 0:  # no labelled token (an empty eval batch): nothing to add
                return
        else:
            logits = logits.reshape(-1, logits.shape[-1])
            labels = labels.reshape(-1)
            streams = None if streams is None else streams.reshape(-1)
        index = getattr(metric, "stream_index", None)
        if index is not None:  # a per-stream metric: this stream's tokens only
            if streams is None:
                raise ValueError("per-stream metrics need batches with stream_ids")
            keep = streams == index
            logits, labels = logits[keep], labels[keep]
            if labels.numel() == 0:  # none of this stream's tokens in the batch
                return
        metric.update(logits, labels)
