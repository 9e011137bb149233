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

    def __getitem__(self, key: str) -> torch.Tensor | None:
        return getattr(self, key)
