"""BERT-style MLM masking: select a fraction of tokens, then 80% [MASK] / 10% random / 10% kept.

Special tokens and padding are never selected. Random replacements come from the real
vocabulary (the tokenizer's non-special, non-reserved ids), not from the batch, so the model
cannot learn that a replaced token is a frequent one. Masking takes an explicit
`torch.Generator`, so a batch's masks are reproducible from (seed, batch number) alone and
resumed runs see the same masks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from flexbert.data.errors import DataError

IGNORE_INDEX = -100


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """(M,) int64 indices of the labelled tokens in the flattened `labels`, ascending.

    Found on the host by the data loader, so a sparse MLM head gathers the masked tokens
    without waiting for the device to find them."""
    return torch.nonzero(labels.flatten() != IGNORE_INDEX).flatten()


class MLMMasker:
    """Mask token ids for MLM; `__call__(ids, generator) -> (masked_ids, labels)`."""

    def __init__(
        self,
        mask_token_id: int,
        allowed_ids: Iterable[int],
        special_ids: Iterable[int],
        mlm_probability: float = 0.30,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ) -> None:
        if not 0.0 <= mlm_probability <= 1.0:
            raise DataError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
            raise DataError(
                f"mask_fraction + random_fraction must be <= 1, got {mask_fraction} + {random_fraction}"
            )
        self.allowed_ids = torch.tensor(sorted(set(allowed_ids)), dtype=torch.long)
        if self.allowed_ids.numel() == 0:
            raise DataError("allowed_ids is empty: no real tokens to draw random replacements from")
        self.special_ids = torch.tensor(
            sorted(set(special_ids) | {mask_token_id}), dtype=torch.long
        )
        self.mask_token_id = mask_token_id
        self.mlm_probability = mlm_probability
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction

    @classmethod
    def from_tokenizer(cls, tokenizer: object, mlm_probability: float = 0.30) -> MLMMasker:
        """Build from a Hugging Face tokenizer: its specials and [unused] tokens are protected."""
        from flexbert.data.tokenizer import (
            allowed_token_ids,
            check_special_tokens,
            protected_token_ids,
        )

        check_special_tokens(tokenizer)
        allowed = allowed_token_ids(tokenizer)
        special = protected_token_ids(tokenizer)
        return cls(tokenizer.mask_token_id, allowed, special, mlm_probability)

    def __call__(
        self, input_ids: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (masked input ids, labels with -100 where not selected); any shape."""
        ids = input_ids.long()
        candidates = ~torch.isin(ids, self.special_ids)
        probs = torch.full(ids.shape, self.mlm_probability)
        selected = torch.bernoulli(probs, generator=generator).bool() & candidates
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        # One uniform draw per token decides mask / random / keep among the selected ones.
        u = torch.rand(ids.shape, generator=generator)
        to_mask = selected & (u < self.mask_fraction)
        to_random = (
            selected & (u >= self.mask_fraction) & (u < self.mask_fraction + self.random_fraction)
        )
        picks = torch.randint(len(self.allowed_ids), ids.shape, generator=generator)
        out = torch.where(to_mask, torch.full_like(ids, self.mask_token_id), ids)
        out = torch.where(to_random, self.allowed_ids[picks], out)
        return out, labels


def batch_generator(seed: int, epoch: int, batch_index: int, rank: int = 0) -> torch.Generator:
    """A generator seeded from (seed, epoch, batch, rank) so any batch's masks can be
    recomputed; each rank draws its own masks."""
    g = torch.Generator()
    if rank:
        state = np.random.SeedSequence([seed, epoch, batch_index, rank]).generate_state(2)
        return g.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    g.manual_seed((seed * 1_000_003 + epoch) * 1_000_000_007 + batch_index & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def documents_generator(seed: int, indices: list[int]) -> torch.Generator:
    """A generator seeded from (seed, the batch's sample indices): the same documents get the
    same masks whatever epoch or position they come in, so padded batches resume exactly."""
    state = np.random.SeedSequence([seed, *indices]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
