"""Retrieval fine-tuning: (query, positive) pairs, in-batch InfoNCE, corpus-level evaluation.

Training: every other positive in a batch is a negative for a query, and so is every hard
negative of the batch (`task.negative_fields`: mined negatives, as the paper's MS MARCO
training used); or, with a teacher's scores (`task.teacher_scores_field`), each query's scores
for its own candidates are distilled from the teacher's (the data: `retrieval_data`).
Evaluation: every eval query is ranked against all eval positives (the eval split is the
corpus), reporting nDCG@10, MRR@10, recall@1 and recall@10 (`task.metrics`), independent of
the batch size. The export is a ModernBertModel (`AutoModel`) directory that is
also a sentence-transformers model: `SentenceTransformer(dir).encode(texts)` gives the same
vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from flexbert.outputs import FlexBertOutput
from flexbert.registry import ConfigError
from flexbert.train.composer_model import FlexBertComposerModel
from flexbert.train.retrieval_data import candidate_inputs, per_query


def load_embedding_model(path: str | Path, **overrides: Any) -> Any:
    """FlexBertForSentenceEmbedding over the encoder of any ModernBERT checkpoint (MLM too):
    a Hugging Face directory or Hub id, a run folder or Composer checkpoint."""
    from flexbert.heads import FlexBertForSentenceEmbedding
    from flexbert.train.checkpoints import load_pretrained

    return load_pretrained(path, FlexBertForSentenceEmbedding, **overrides)  # drops MLM heads


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, normalize: bool = False
) -> torch.Tensor:
    """KL(teacher || student) between the softmaxes of (B, n) scores of each query's own
    candidates, averaged over queries: PyLate's `Distillation`. Teacher scores are logits;
    `normalize` first min-max scales each row of student scores to [0, 1], as PyLate does
    for MaxSim scores."""
    student = student.float()
    if normalize:
        low, high = student.amin(1, keepdim=True), student.amax(1, keepdim=True)
        student = (student - low) / (high - low + 1e-8)
    return torch.nn.functional.kl_div(
        torch.nn.functional.log_softmax(student, dim=-1),
        torch.nn.functional.log_softmax(teacher.float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def positive_ranks(
    queries: torch.Tensor,
    docs: Any,
    chunk: int = 1024,
    score: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(N,) 1-based rank of doc i for query i among all N docs (ties do not count against).

    Scored `chunk` queries at a time, so memory stays O(chunk x N). `score(query_chunk,
    docs)` -> (c, N) scores; default: dot products of (N, D) vectors."""
    ranks = []
    for start in range(0, queries.shape[0], chunk):
        part = queries[start : start + chunk]
        scores = part @ docs.T if score is None else score(part, docs)  # (c, N)
        rows = torch.arange(scores.shape[0], device=scores.device)
        own = scores[rows, rows + start]  # (c,)
        ranks.append((scores > own[:, None]).sum(-1) + 1)
    return torch.cat(ranks)


def _ndcg_at_10(ranks: torch.Tensor) -> torch.Tensor:  # one relevant doc per query
    return torch.where(ranks <= 10, 1.0 / torch.log2(ranks.float() + 1), 0.0).mean()


def _mrr_at_10(ranks: torch.Tensor) -> torch.Tensor:
    return torch.where(ranks <= 10, 1.0 / ranks.float(), 0.0).mean()


RANK_METRICS = {
    "ndcg_at_10": _ndcg_at_10,
    "mrr_at_10": _mrr_at_10,
    "recall_at_1": lambda ranks: (ranks <= 1).float().mean(),
    "recall_at_10": lambda ranks: (ranks <= 10).float().mean(),
}


class CorpusEmbeddings(Metric):
    """The eval split's query and positive embeddings, kept once for all the ranking metrics
    of a task (`retrieval_metrics`), and ranked once per evaluation: `compute()` -> (N,)
    1-based rank of each query's positive among every eval positive (the corpus), as
    BEIR-style evaluation does, not only within its batch. Each rank's embeddings are
    concatenated in rank order, so queries stay aligned with their positives."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("queries", default=[], dist_reduce_fx="cat")
        self.add_state("docs", default=[], dist_reduce_fx="cat")

    def update(self, queries: torch.Tensor, docs: torch.Tensor) -> None:
        self.queries.append(queries.float())
        self.docs.append(docs.float())

    def compute(self) -> torch.Tensor:
        from torchmetrics.utilities import dim_zero_cat

        return positive_ranks(dim_zero_cat(self.queries), dim_zero_cat(self.docs))


class CorpusRetrievalMetric(Metric):
    """One ranking metric (RANK_METRICS) over the eval corpus. The metrics of a task share one
    `store` (torchmetrics caches its ranks until the next update): the first one, which made
    the store, feeds it; the others only read, so the eval embeddings are kept and ranked once
    however many metrics are asked for. Composer deep-copies a model's metrics in one go, which
    keeps them sharing."""

    full_state_update = False
    store_class: type[Metric] = CorpusEmbeddings

    def __init__(self, name: str, store: Metric | None = None) -> None:
        super().__init__()
        self.score = RANK_METRICS[name]
        self.owner = store is None
        self.store = self.store_class() if store is None else store

    def update(self, *args: torch.Tensor) -> None:
        if self.owner:
            self.store.update(*args)

    def compute(self) -> torch.Tensor:
        return self.score(self.store.compute())

    def reset(self) -> None:
        super().reset()
        if self.owner:
            self.store.reset()


def retrieval_metrics(
    names: Sequence[str],
    metric: Callable[..., CorpusRetrievalMetric] = CorpusRetrievalMetric,
    kind: str = "retrieval",
) -> dict[str, Metric]:
    """`metric(name, store)` for each name in task.metrics, all sharing the first one's
    embedding store; a name not in RANK_METRICS is refused."""
    bad = [n for n in names if n not in RANK_METRICS]
    if bad:
        raise ConfigError(
            f"task.metrics: {bad} do not apply to {kind}; choose from {list(RANK_METRICS)}"
        )
    out: dict[str, Metric] = {}
    for name in names:
        first = next(iter(out.values()), None)
        out[name] = metric(name, first.store if first is not None else None)
    return out


def gather_candidates(cand: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's candidate embeddings in rank order, and this rank's offset among them;
    gradients flow back to each rank's own part. One process: `cand` itself, offset 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cand, 0
    return torch.cat(gather_with_grad(cand)), dist.get_rank() * cand.shape[0]


def gather_with_grad(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all), differentiable: each rank's part gets the
    sum of every rank's gradient for it."""
    from torch.distributed.nn.functional import all_gather

    return [_ContiguousGrad.apply(part) for part in all_gather(tensor)]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. torch's all_gather backward
    receives into `empty_like(grad)` buffers, which keep a strided gradient's layout (MaxSim's
    einsum gives one) while the collective writes them as contiguous memory: without this the
    gradients sent back to each rank came out scrambled (found on gloo with ColBERT)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class ComposerFlexBertRetrieval(FlexBertComposerModel):
    """In-batch InfoNCE over (query, positive) pairs; corpus-level ranking metrics on eval.
    With teacher scores in the batch (`task.teacher_scores_field`), training distils them
    instead: each query's scores for its own positive and hard negatives against the
    teacher's (`distillation_loss`).

    With several ranks, training scores every query against every rank's positives and hard
    negatives (`gather_negatives`, on by default): the negatives of one global batch, as one
    process with the whole batch would see them. Evaluation ranks every eval query against all
    eval positives (`CorpusRetrievalMetric`)."""

    # what a subclass (ColBERT) changes: the pool of negatives, the corpus metric, own_scores
    candidate_pool: Callable[..., Any] = staticmethod(gather_candidates)
    distill_normalize = False  # ColBERT's MaxSim scores are min-max scaled first (PyLate)
    corpus_metric: Callable[..., CorpusRetrievalMetric] = CorpusRetrievalMetric
    kind = "retrieval"

    def __init__(
        self,
        model: torch.nn.Module,
        gather_negatives: bool = True,
        metrics: Sequence[str] = ("ndcg_at_10",),
    ) -> None:
        super().__init__(model)
        self.gather_negatives = gather_negatives
        self.val_metrics = retrieval_metrics(metrics, self.corpus_metric, self.kind)

    def forward(self, batch: dict[str, Any]) -> Any:
        if self.training and "teacher_scores" in batch:  # knowledge distillation
            student = self.own_scores(batch)
            loss = distillation_loss(student, batch["teacher_scores"], self.distill_normalize)
            return FlexBertOutput(loss=loss, logits=student)
        pool = self.candidate_pool if self.training and self.gather_negatives else None
        return self.model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            candidates=candidate_inputs(batch),
            candidate_pool=pool,
        )

    def own_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, 1 + k) scores of each query against its own positive and hard negatives only
        (what distillation compares with the teacher's): cosine / temperature."""
        queries = self.model.embed(batch["input_ids"], batch["attention_mask"])  # (B, D)
        docs = per_query(self.model.embed(*candidate_inputs(batch)), queries.shape[0])
        return torch.einsum("bd,bnd->bn", queries, docs) / self.model.temperature

    def update_metric(self, batch: dict[str, Any], outputs: FlexBertOutput, metric) -> None:
        metric.update(outputs.embeddings.detach(), outputs.candidate_embeddings.detach())
