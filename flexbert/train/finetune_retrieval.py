"""Retrieval fine-tuning: (query, positive) pairs, in-batch InfoNCE, corpus-level evaluation.

Training: every other positive in a batch is a negative for a query, and so is every hard
negative of the batch (`task.negative_fields`: mined negatives, as the paper's MS MARCO
training used); or, with a teacher's scores (`task.teacher_scores_field`), each query's scores
for its own candidates are distilled from the teacher's. Evaluation: every eval query is ranked against all eval positives (the eval
split is the corpus), reporting nDCG@10, MRR@10, recall@1 and recall@10 (`task.metrics`),
independent of the batch size. The export is a ModernBertModel (`AutoModel`) directory that is
also a sentence-transformers model: `SentenceTransformer(dir).encode(texts)` gives the same
vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from flexbert.outputs import FlexBertOutput
from flexbert.registry import ConfigError
from flexbert.train.composer_model import FlexBertComposerModel
from flexbert.train.tasks import pad_rows


def load_embedding_model(path: str | Path, **overrides: Any) -> Any:
    """FlexBertForSentenceEmbedding over the encoder of any ModernBERT checkpoint (MLM too):
    a Hugging Face directory or Hub id, a run folder or Composer checkpoint."""
    from flexbert.heads import FlexBertForSentenceEmbedding
    from flexbert.train.checkpoints import load_pretrained

    return load_pretrained(path, FlexBertForSentenceEmbedding, **overrides)  # drops MLM heads


def encode_pairs(
    ds: Any,
    task: Mapping[str, Any],
    tokenizer: Any,
    max_len: int,
    split: str,
    query_max_len: int | None = None,
    for_training: bool = True,
) -> list[dict[str, Any]]:
    """Rows {query ids, positive ids} from task.text_fields = [query_field, positive_field];
    queries are cut to `query_max_len` tokens (default: max_len, as positives are). Training
    rows also carry their hard negatives' ids (`neg_ids`, `hard_negatives`) when
    task.negative_fields names any; evaluation ranks against the positives alone."""
    from flexbert.data.errors import DataError
    from flexbert.train.tasks import check_fields

    fields = list(task["text_fields"])
    if len(fields) != 2:
        raise DataError(f"task.text_fields: retrieval needs [query, positive], got {fields}")
    check_fields(ds, fields, split)
    q, p = ([str(t) for t in ds[f]] for f in fields)
    q_ids = tokenizer(q, truncation=True, max_length=query_max_len or max_len)["input_ids"]
    p_ids = tokenizer(p, truncation=True, max_length=max_len)["input_ids"]
    rows = [{"input_ids": a, "cand_ids": b} for a, b in zip(q_ids, p_ids)]
    negatives = hard_negatives(ds, task, split) if for_training else None
    if negatives is None:
        return rows
    texts, k = negatives
    flat = tokenizer([t for row in texts for t in row[:k]], truncation=True, max_length=max_len)
    scores = teacher_scores(ds, task, split, [len(t) for t in texts], k)
    for i, row in enumerate(rows):
        row["neg_ids"] = flat["input_ids"][i * k : (i + 1) * k]
        if scores is not None:
            row["teacher_scores"] = scores[i]
    return rows


def hard_negatives(
    ds: Any, task: Mapping[str, Any], split: str
) -> tuple[list[list[str]], int] | None:
    """Each row's hard negatives and how many of them every row uses (what a batch needs to
    line up), or None without task.negative_fields. A field holds one text or a list of texts
    per row; the row's negatives are its fields' texts in order, of which the first
    task.num_negatives are used when that is set (else every row must have as many)."""
    from flexbert.data.errors import DataError
    from flexbert.train.tasks import check_fields

    fields = list(task.get("negative_fields") or [])
    if not fields:
        if task.get("teacher_scores_field"):
            raise ConfigError(
                "task.teacher_scores_field needs task.negative_fields: the teacher scores each "
                "query's positive and its hard negatives"
            )
        return None
    check_fields(ds, fields, split)
    limit = task.get("num_negatives")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"task.num_negatives: a positive integer or null, got {limit!r}")
    columns = [ds[f] for f in fields]  # each column read once (a Dataset copies it)
    rows = []
    for i in range(len(columns[0])):
        texts: list[str] = []
        for field, column in zip(fields, columns):
            value = column[i]
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(v is None or (isinstance(v, str) and not v.strip()) for v in values):
                raise DataError(f"split '{split}' row {i}: field '{field}' has an empty negative")
            texts += [str(v) for v in values]
        rows.append(texts)
    counts = [len(r) for r in rows]
    want = limit if limit is not None else counts[0]
    short = next(
        (i for i, n in enumerate(counts) if n < want or (limit is None and n != want)), None
    )
    if short is not None:
        wanted = f"task.num_negatives={limit}" if limit is not None else f"{want}, as row 0 has"
        raise DataError(
            f"split '{split}' row {short} has {counts[short]} hard negative(s) in "
            f"{fields}, not {wanted}; every row needs as many (set task.num_negatives to use "
            f"the first N of each row, N <= {min(counts)})"
        )
    return rows, want


def teacher_scores(
    ds: Any, task: Mapping[str, Any], split: str, counts: Sequence[int], k: int
) -> list[list[float]] | None:
    """task.teacher_scores_field's scores (a teacher's logits, e.g. a reranker's) for each
    row's positive and its hard negatives, in that order, cut like the negatives to 1 + k;
    None when the field is not set (contrastive training)."""
    import math

    from flexbert.data.errors import DataError
    from flexbert.train.tasks import check_fields

    field = task.get("teacher_scores_field")
    if not field:
        return None
    check_fields(ds, [field], split)
    out = []
    for i, (value, n) in enumerate(zip(ds[field], counts)):
        ok = isinstance(value, (list, tuple)) and len(value) == 1 + n
        if ok:
            ok = all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in value
            )
        if not ok:
            raise DataError(
                f"split '{split}' row {i}: field '{field}' holds {value!r}; it needs {1 + n} "
                "finite numbers: the teacher's score for the positive, then one per hard negative"
            )
        out.append([float(v) for v in value[: 1 + k]])
    return out


class PairCollator:
    """Queries and positives padded separately, each to its own longest row. Hard negatives
    (B, k, L) share the positives' width L, so a batch's candidates are its positives
    followed by its negatives, row by row (`candidate_inputs`)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([r["input_ids"] for r in rows], self.pad_id)
        docs = [r["cand_ids"] for r in rows]
        k = len(rows[0].get("neg_ids", ()))
        docs += [neg for r in rows for neg in r.get("neg_ids", ())]
        cand, cand_mask = pad_rows(docs, self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask}
        batch |= {"cand_ids": cand[: len(rows)], "cand_mask": cand_mask[: len(rows)]}
        if k:
            width = cand.shape[1]
            batch["neg_ids"] = cand[len(rows) :].view(len(rows), k, width)
            batch["neg_mask"] = cand_mask[len(rows) :].view(len(rows), k, width)
        if "teacher_scores" in rows[0]:
            batch["teacher_scores"] = torch.tensor([r["teacher_scores"] for r in rows])
        return batch


def candidate_inputs(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of every candidate a batch's queries are scored against: its B positives
    first (query i's is candidate i), then its B x k hard negatives."""
    if "neg_ids" not in batch:
        return batch["cand_ids"], batch["cand_mask"]
    ids = torch.cat([batch["cand_ids"], batch["neg_ids"].flatten(0, 1)])
    return ids, torch.cat([batch["cand_mask"], batch["neg_mask"].flatten(0, 1)])


def per_query(candidates: torch.Tensor, num_queries: int) -> torch.Tensor:
    """A batch's candidates in `candidate_inputs` order (B positives, then B x k hard
    negatives) -> (B, 1 + k, ...): each query's own positive, then its own negatives."""
    positives, negatives = candidates[:num_queries], candidates[num_queries:]
    negatives = negatives.view(num_queries, -1, *candidates.shape[1:])
    return torch.cat([positives[:, None], negatives], dim=1)


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
