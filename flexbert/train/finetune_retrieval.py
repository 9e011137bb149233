"""Retrieval fine-tuning: (query, positive) pairs, in-batch InfoNCE, recall@1 on eval batches.

Every other positive in a batch is a negative for a query, so recall@1 is measured among the
`data.eval_batch_size` candidates of each eval batch (a quick, comparable signal, not a full
corpus search). The export is a ModernBertModel (`AutoModel`) directory that is also a
sentence-transformers model: `SentenceTransformer(dir).encode(texts)` gives the same vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from flexbert.outputs import FlexBertOutput
from flexbert.train.composer_model import FlexBertComposerModel


def load_embedding_model(path: str | Path, **overrides: Any) -> Any:
    """FlexBertForSentenceEmbedding over the encoder of any ModernBERT checkpoint (MLM too)."""
    from flexbert.heads import FlexBertForSentenceEmbedding

    return FlexBertForSentenceEmbedding.from_hf(path, **overrides)  # drops MLM/classifier heads


def encode_pairs(
    ds: Any, task: Mapping[str, Any], tokenizer: Any, max_len: int, split: str
) -> list[dict[str, Any]]:
    """Rows {query ids, positive ids} from task.text_fields = [query_field, positive_field]."""
    from flexbert.data.errors import DataError
    from flexbert.train.tasks import check_fields

    fields = list(task["text_fields"])
    if len(fields) != 2:
        raise DataError(f"task.text_fields: retrieval needs [query, positive], got {fields}")
    check_fields(ds, fields, split)
    q, p = ([str(t) for t in ds[f]] for f in fields)
    q_ids = tokenizer(q, truncation=True, max_length=max_len)["input_ids"]
    p_ids = tokenizer(p, truncation=True, max_length=max_len)["input_ids"]
    return [{"input_ids": a, "cand_ids": b} for a, b in zip(q_ids, p_ids)]


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


class PairCollator:
    """Queries and positives padded separately, each to its own longest row."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = _pad([r["input_ids"] for r in rows], self.pad_id)
        cand, cand_mask = _pad([r["cand_ids"] for r in rows], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "cand_ids": cand, "cand_mask": cand_mask}


class RecallAt1(Metric):
    """Share of queries whose own positive scores highest among the batch's candidates."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("hits", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor) -> None:
        target = torch.arange(scores.shape[0], device=scores.device)
        self.hits += (scores.argmax(-1) == target).sum()
        self.total += scores.shape[0]

    def compute(self) -> torch.Tensor:
        return self.hits / self.total.clamp(min=1)


def gather_candidates(cand: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's candidate embeddings in rank order, and this rank's offset among them;
    gradients flow back to each rank's own part. One process: `cand` itself, offset 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cand, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(cand)), dist.get_rank() * cand.shape[0]


class ComposerFlexBertRetrieval(FlexBertComposerModel):
    """In-batch InfoNCE over (query, positive) pairs; recall@1 on eval.

    With several ranks, training scores every query against every rank's positives
    (`gather_negatives`, on by default): the negatives of one global batch, as one process with
    the whole batch would see them. Evaluation stays per rank (recall@1 among its batch)."""

    def __init__(self, model: torch.nn.Module, gather_negatives: bool = True) -> None:
        super().__init__(model)
        self.gather_negatives = gather_negatives
        self.val_metrics = {"recall_at_1": RecallAt1()}

    def forward(self, batch: dict[str, Any]) -> FlexBertOutput:
        pool = gather_candidates if self.training and self.gather_negatives else None
        return self.model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            candidates=(batch["cand_ids"], batch["cand_mask"]),
            candidate_pool=pool,
        )

    def update_metric(self, batch: dict[str, Any], outputs: FlexBertOutput, metric) -> None:
        metric.update(outputs.logits.detach())
