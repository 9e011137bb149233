"""Model outputs: plain dataclasses with the fields every head fills in."""

from __future__ import annotations

from dataclasses import dataclass

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

    def __getitem__(self, key: str) -> torch.Tensor | None:
        return getattr(self, key)
