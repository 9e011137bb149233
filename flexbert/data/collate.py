"""Padded collation: documents -> (B, L) input_ids, attention_mask and MLM labels, plus
`label_positions` (M,): the indices of the labelled tokens in the flattened (B * L) labels,
and with `stream_of` (document index -> stream) `stream_ids` (B, L), -1 on padding.

For `padding: padded` runs and ablations against the packed path. Rows are padded to the
longest document in the batch (or to a fixed `pad_to` length for static shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from flexbert.data.errors import DataError
from flexbert.data.masking import IGNORE_INDEX, MLMMasker, documents_generator, label_positions


class PaddedMLMCollator:
    """Collate a list of token-id documents (or `{"input_ids": ...}` dicts) into a padded batch.

    Documents longer than `max_seq_len` are truncated here (shards are normally written with a
    max_length no larger than the training length, so this is a guard, not a data path).
    """

    def __init__(
        self,
        pad_token_id: int,
        max_seq_len: int,
        masker: MLMMasker | None = None,
        pad_to: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        stream_of: Callable[[int], int] | None = None,
    ) -> None:
        if pad_to is not None and pad_to < max_seq_len:
            raise DataError(f"pad_to={pad_to} is shorter than max_seq_len={max_seq_len}")
        self.pad_token_id = pad_token_id
        self.max_seq_len = max_seq_len
        self.masker = masker
        self.pad_to = pad_to
        self.generator = generator
        self.seed = seed  # when set, masks are seeded per batch from its documents' indices
        self.stream_of = stream_of

    def __call__(self, docs: Sequence[Any]) -> dict[str, torch.Tensor]:
        seqs = [
            np.asarray(d["input_ids"] if isinstance(d, dict) else d)[: self.max_seq_len]
            for d in docs
        ]
        if not seqs:
            raise DataError("cannot collate an empty batch")
        length = self.pad_to or max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)  # (B, L)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.from_numpy(s.astype(np.int64))
            mask[i, : len(s)] = 1
        if self.masker is None:
            masked = ids
            labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
        else:
            generator = self.generator
            if self.seed is not None and all(isinstance(d, dict) and "index" in d for d in docs):
                generator = documents_generator(self.seed, [int(d["index"]) for d in docs])
            masked, labels = self.masker(ids, generator)
            labels = labels.masked_fill(~mask.bool(), IGNORE_INDEX)
        blank = [i for i, d in enumerate(docs) if isinstance(d, dict) and d.get("blank")]
        if blank:  # rows that only keep the ranks in step (padded_eval_loader): no labels
            labels[blank] = IGNORE_INDEX
        batch = {
            "input_ids": masked,
            "attention_mask": mask,
            "labels": labels,
            "label_positions": label_positions(labels),
        }
        if self.stream_of is not None:
            streams = torch.tensor([self.stream_of(int(d["index"])) for d in docs])
            streams[blank] = -1
            batch["stream_ids"] = streams[:, None].expand(-1, length).masked_fill(~mask.bool(), -1)
        return batch
