"""Synthetic document sets of the paper's protocol and the batches each model consumes.

Four sets: fixed short (512), variable short (lengths ~ N(256, 64) clipped to [16, 512]),
fixed long (8192) and variable long (N(4096, 1024) clipped to [16, 8192]); in general a set of
maximum length L draws N(L/2, L/8) clipped to [16, L]. Token ids are random and avoid special
ids. FlexBERT gets each batch packed (flat ids + cu_seqlens + a host-side max_seqlen); the
Hugging Face models get the same documents, in the same order, padded to the batch's longest
document with an attention mask. Only real tokens are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

WORKLOAD_KEYS = ("fixed-short", "var-short", "fixed-long", "var-long")
MIN_DOC_LEN = 16


@dataclass(frozen=True)
class Workload:
    key: str  # one of WORKLOAD_KEYS
    max_len: int  # the fixed length, or the clip bound of a variable set
    variable: bool

    @property
    def label(self) -> str:
        """The paper's name for the set: fixed-512, var-256, fixed-8192, var-4096."""
        return f"var-{self.max_len // 2}" if self.variable else f"fixed-{self.max_len}"

    @property
    def long(self) -> bool:
        return self.key.endswith("long")


def make_workload(key: str, short_len: int = 512, long_len: int = 8192) -> Workload:
    if key not in WORKLOAD_KEYS:
        raise ValueError(f"unknown workload '{key}'; valid workloads are {list(WORKLOAD_KEYS)}")
    max_len = long_len if key.endswith("long") else short_len
    return Workload(key, max_len, key.startswith("var"))


def sample_lengths(workload: Workload, num_docs: int, seed: int = 0) -> list[int]:
    """Document lengths: all max_len, or N(L/2, L/8) rounded and clipped to [16, L]."""
    if not workload.variable:
        return [workload.max_len] * num_docs
    gen = torch.Generator().manual_seed(seed)
    mean, std = workload.max_len / 2, workload.max_len / 8
    lengths = (torch.randn(num_docs, generator=gen, dtype=torch.float64) * std + mean).round()
    return lengths.clamp(min(MIN_DOC_LEN, workload.max_len), workload.max_len).long().tolist()


def make_documents(
    lengths: list[int], id_range: tuple[int, int], seed: int = 0
) -> list[torch.Tensor]:
    """One 1-D int64 tensor of random ids in [low, high) per document (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randint(*id_range, (sum(lengths),), generator=gen, dtype=torch.long)
    return list(flat.split(lengths))


@dataclass
class ModelBatch:
    """Keyword arguments for one forward pass plus what they hold."""

    kwargs: dict[str, Any]
    num_tokens: int  # real tokens only
    num_docs: int
    shape: tuple[int, ...] = field(default=())


def packed_batch(docs: list[torch.Tensor], device: str | torch.device) -> ModelBatch:
    """Unpadded layout: flat ids, int32 cu_seqlens and max_seqlen computed on the host."""
    lengths = [d.numel() for d in docs]
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    ids = torch.cat(docs).to(device)
    kwargs = {"input_ids": ids, "cu_seqlens": cu.to(device), "max_seqlen": max(lengths)}
    return ModelBatch(kwargs, sum(lengths), len(docs), tuple(ids.shape))


def padded_batch(docs: list[torch.Tensor], device: str | torch.device, pad_id: int) -> ModelBatch:
    """Padded layout: (B, longest) ids, right-padded with pad_id, and a (B, longest) mask."""
    lengths = [d.numel() for d in docs]
    ids = torch.full((len(docs), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        ids[row, : doc.numel()] = doc
        mask[row, : doc.numel()] = 1
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    return ModelBatch(kwargs, sum(lengths), len(docs), tuple(ids.shape))


def make_batches(
    docs: list[torch.Tensor],
    batch_docs: int,
    layout: str,
    device: str | torch.device,
    pad_id: int = 0,
) -> list[ModelBatch]:
    """Split the documents, in order, into batches of `batch_docs` in the given layout."""
    if layout not in ("packed", "padded"):
        raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}")
    chunks = [docs[i : i + batch_docs] for i in range(0, len(docs), batch_docs)]
    if layout == "packed":
        return [packed_batch(chunk, device) for chunk in chunks]
    return [padded_batch(chunk, device, pad_id) for chunk in chunks]


# ---------------------------------------------------------------- training rows
Segment = tuple[int, int, int]  # (document index, start, stop) within that document


def pack_rows(lengths: list[int], row_len: int) -> list[list[Segment]]:
    """Greedy packing: stream documents back to back into rows of `row_len` tokens.

    A document that does not fit the rest of a row continues in the next one, so every row but
    the last is completely full and every token of every document lands exactly once.
    """
    rows: list[list[Segment]] = [[]]
    free = row_len
    for doc, length in enumerate(lengths):
        start = 0
        while start < length:
            if free == 0:
                rows.append([])
                free = row_len
            take = min(free, length - start)
            rows[-1].append((doc, start, start + take))
            start += take
            free -= take
    return rows if rows[0] else []


def rows_to_ids(docs: list[torch.Tensor], rows: list[list[Segment]], row_len: int) -> torch.Tensor:
    """(num_full_rows, row_len) ids of the full rows (a trailing partial row is dropped)."""
    full = [row for row in rows if sum(stop - start for _, start, stop in row) == row_len]
    out = torch.empty(len(full), row_len, dtype=torch.long)
    for i, row in enumerate(full):
        out[i] = torch.cat([docs[doc][start:stop] for doc, start, stop in row])
    return out


def training_rows(
    num_rows: int, row_len: int, id_range: tuple[int, int], doc_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """`num_rows` full rows packed from variable-length documents (lengths as var-short)."""
    workload = Workload("var-short", doc_len, True)
    needed = num_rows * row_len
    num_docs = max(1, 2 * needed // (doc_len // 2) + 1)  # mean length L/2: about 2x enough
    lengths = sample_lengths(workload, num_docs, seed)
    docs = make_documents(lengths, id_range, seed)
    rows = rows_to_ids(docs, pack_rows(lengths, row_len), row_len)
    return rows[:num_rows]


def mlm_mask(
    ids: torch.Tensor, mask_id: int, probability: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """30% of positions become `mask_id`; labels hold their original ids, -100 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(ids.shape, generator=gen) < probability
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return ids.masked_fill(chosen, mask_id), labels
