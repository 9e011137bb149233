"""Retrieval data: (query, positive) pairs with optional hard negatives and teacher scores,
encoded from a split and collated into batches, shared by retrieval and ColBERT fine-tuning.

A training batch scores each query against its candidates in one order (`candidate_inputs`):
the batch's B positives (query i's is candidate i), then its B x k hard negatives, row by row.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flexbert.data.errors import DataError
from flexbert.registry import ConfigError
from flexbert.train.tasks import check_fields, pad_rows, text_column


def encode_pairs(
    ds: Any,
    task: Mapping[str, Any],
    tokenizer: Any,
    max_len: int,
    split: str,
    query_max_len: int | None = None,
    for_training: bool = True,
) -> list[dict[str, Any]]:
    """Rows {input_ids, cand_ids}: query and positive ids from task.text_fields =
    [query_field, positive_field]; queries are cut to `query_max_len` tokens (default:
    max_len, as every document is). Training rows also carry their hard negatives' ids
    (`neg_ids`) when task.negative_fields names any, and the teacher's scores
    (`teacher_scores`) with task.teacher_scores_field; evaluation rows never do (they are
    ranked against the eval positives alone)."""
    fields = list(task["text_fields"])
    if len(fields) != 2:
        raise DataError(f"task.text_fields: retrieval needs [query, positive], got {fields}")
    check_fields(ds, fields, split)
    q, p = (text_column(ds[f], split, f) for f in fields)
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


def _written_as_text(value: Any) -> bool:
    """A list that a CSV/TSV file (no list type) holds as its text, e.g. "['a', 'b']"."""
    if not isinstance(value, str) or not value.strip().startswith("["):
        return False
    try:
        return isinstance(ast.literal_eval(value.strip()), list)
    except (ValueError, SyntaxError):
        return False


def _list_hint(split: str, i: int, field: str, what: str) -> str:
    return (
        f"split '{split}' row {i}: field '{field}' holds {what} written as text (CSV and TSV "
        "have no list type): use JSONL or Parquet for list fields, or one column per hard "
        "negative (task.negative_fields=[neg1,neg2,...])"
    )


def hard_negatives(
    ds: Any, task: Mapping[str, Any], split: str
) -> tuple[list[list[str]], int] | None:
    """Each row's hard negatives and how many of them every row uses (what a batch needs to
    line up), or None without task.negative_fields. A field holds one text or a list of texts
    per row; the row's negatives are its fields' texts in order, of which the first
    task.num_negatives are used when that is set (else every row must have as many)."""
    fields = task.get("negative_fields") or []
    fields = [fields] if isinstance(fields, str) else list(fields)  # one name, or a list
    if not fields:
        if task.get("teacher_scores_field"):
            raise ConfigError(
                "task.teacher_scores_field needs task.negative_fields: the teacher scores each "
                "query's positive and its hard negatives"
            )
        return None
    check_fields(ds, fields, split, "task.negative_fields")
    limit = task.get("num_negatives")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"task.num_negatives: a positive integer or null, got {limit!r}")
    columns = [ds[f] for f in fields]  # each column read once (a Dataset copies it)
    rows = []
    for i in range(len(columns[0])):
        texts: list[str] = []
        for field, column in zip(fields, columns):
            value = column[i]
            if _written_as_text(value):
                raise DataError(_list_hint(split, i, field, "a list of negatives"))
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(v is None or (isinstance(v, str) and not v.strip()) for v in values):
                raise DataError(f"split '{split}' row {i}: field '{field}' has an empty negative")
            texts += [str(v) for v in values]
        if not texts:
            raise DataError(f"split '{split}' row {i} has no hard negative in {fields}")
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
    row's positive and every one of its hard negatives (`counts`, before task.num_negatives
    cuts them), in that order, then cut like the negatives to 1 + k; None when the field is
    not set (contrastive training)."""
    field = task.get("teacher_scores_field")
    if not field:
        return None
    check_fields(ds, [field], split, "task.teacher_scores_field")
    out = []
    for i, (value, n) in enumerate(zip(ds[field], counts)):
        if _written_as_text(value):
            raise DataError(_list_hint(split, i, field, "its scores"))
        ok = isinstance(value, (list, tuple)) and len(value) == 1 + n
        if ok:
            ok = all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in value
            )
        if not ok:
            raise DataError(
                f"split '{split}' row {i}: field '{field}' holds {value!r}; it needs {1 + n} "
                "finite numbers: the teacher's score for the positive, then one per hard "
                "negative of the row (all of them, before task.num_negatives)"
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
