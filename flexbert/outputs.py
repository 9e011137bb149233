"""Model outputs: plain dataclasses with the fields every head fills in."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class FlexBertOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None  # pooled sentence embeddings, where computed
    candidate_embeddings: torch.Tensor | None = None  # retrieval: this batch's candidates
    start_logits: torch.Tensor | None = None  # question answering: (num_seqs, L)
    end_logits: torch.Tensor | None = None

    def __getitem__(self, key: str | int) -> torch.Tensor | None:
        """By name (`out["logits"]`), or by position among the fields that are set, as
        transformers' outputs index (`out[0]`: the loss when there is one, else the logits)."""
        if isinstance(key, int):
            return self.to_tuple()[key]
        return getattr(self, key)

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """The fields that are set, in order (transformers' `ModelOutput.to_tuple`)."""
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)
