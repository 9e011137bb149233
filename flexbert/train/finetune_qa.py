"""Extractive question answering (SQuAD-style): data, span decoding, metrics, Composer wrapper.

Rows hold a question, a context and `answers` as in SQuAD: `{"text": [...], "answer_start":
[...]}` (character offsets into the context). Each example becomes one sequence
`[CLS] question [SEP] context [SEP]`, the context truncated to fit `data.max_seq_len`
(ModernBERT reads 8192 tokens, so set it long enough for your contexts); a training example
whose answer was cut off targets [CLS]. Evaluation decodes the best span inside the context
(start <= end, at most `task.max_answer_tokens`) back to its text through the tokenizer's
offsets and scores it against every gold answer with SQuAD's exact match and F1 (lower case,
no punctuation, articles or extra spaces). Examples without an answer (SQuAD v2) need
`task.allow_no_answer=true`: they target [CLS], and evaluation answers "" when the [CLS]
score beats the best span's, as SQuAD v2's evaluation does.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from flexbert.data.errors import DataError
from flexbert.outputs import FlexBertOutput
from flexbert.train.composer_model import FlexBertComposerModel
from flexbert.train.tasks import check_fields, pad_rows

QA_INPUTS = ("input_ids", "attention_mask", "start_positions", "end_positions")
QA_METRICS = ("exact_match", "f1")


# ------------------------------------------------------------------------------ data
def answer_char_span(
    answers: Any, context: str, where: str, allow_no_answer: bool = False
) -> tuple[int, int] | None:
    """(start, end) characters of the first gold answer, None when there is none (allowed
    only with `allow_no_answer`); the text must be found at its answer_start (a mismatch is
    bad data, named by `where`)."""
    if not isinstance(answers, Mapping) or "text" not in answers or "answer_start" not in answers:
        raise DataError(
            f"{where}: answers must be {{'text': [...], 'answer_start': [...]}}, got {answers!r}"
        )
    texts, starts = list(answers["text"]), list(answers["answer_start"])
    if len(texts) != len(starts):
        raise DataError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start")
    if not texts:
        if allow_no_answer:
            return None
        raise DataError(
            f"{where}: no answer; for data with unanswerable questions (SQuAD v2) set "
            "task.allow_no_answer=true"
        )
    start, text = int(starts[0]), str(texts[0])
    if context[start : start + len(text)] != text:
        found = context[start : start + len(text)]
        raise DataError(
            f"{where}: answer {text!r} is not at answer_start={start} of the context "
            f"(found {found!r} there)"
        )
    return start, start + len(text)


def token_span(
    offsets: Sequence[tuple[int, int]], in_context: Sequence[bool], chars: tuple[int, int] | None
) -> tuple[int, int]:
    """First and last token covering the answer's characters; (0, 0) ([CLS]) when the answer
    is absent or was truncated away."""
    context = [i for i, c in enumerate(in_context) if c]
    if chars is None or not context:
        return 0, 0
    start_char, end_char = chars
    if offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    first = next(i for i in context if offsets[i][1] > start_char)
    last = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return first, max(first, last)


def encode_questions(
    ds: Any,
    task: Mapping[str, Any],
    tokenizer: Any,
    max_len: int,
    split: str,
    for_eval: bool = False,
) -> list[dict[str, Any]]:
    """text_fields = [question, context], label_field = answers -> one row per example with
    the answer's token span and, `for_eval`, what decoding needs (context offsets, gold texts:
    kept for the eval split only, they outweigh the ids)."""
    fields = list(task["text_fields"])
    if len(fields) != 2:
        raise DataError(
            f"task.text_fields: question answering needs [question, context], got {fields}"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("question answering needs a fast tokenizer (character offsets)")
    answer_field = task["label_field"]
    check_fields(ds, [*fields, answer_field], split)
    questions = [str(t).lstrip() for t in ds[fields[0]]]  # leading spaces only cost room
    contexts = [str(t) for t in ds[fields[1]]]
    answers = ds[answer_field]
    allow_no_answer = bool(task.get("allow_no_answer", False))
    try:
        enc = tokenizer(
            questions,
            contexts,
            truncation="only_second",
            max_length=max_len,
            return_offsets_mapping=True,
        )
    except Exception as e:  # noqa: BLE001 - a question longer than max_len, mostly
        raise DataError(
            f"split '{split}': could not fit question + context into data.max_seq_len="
            f"{max_len} ({e}); raise data.max_seq_len or shorten the questions"
        ) from e
    rows = []
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        in_context = [s == 1 for s in enc.sequence_ids(i)]
        where = f"split '{split}' row {i}"
        chars = answer_char_span(answers[i], contexts[i], where, allow_no_answer)
        start, end = token_span(offsets, in_context, chars)
        row = {"input_ids": ids, "start_positions": start, "end_positions": end}
        if for_eval:
            row["offsets"] = [list(o) if c else [-1, -1] for o, c in zip(offsets, in_context)]
            row["context"] = contexts[i]
            row["answers"] = [str(t) for t in answers[i]["text"]] or [""]
        rows.append(row)
    return rows


class QACollator:
    """Padded ids and mask, the target spans and, for eval rows, each token's context offsets
    ((-1, -1) outside the context) and, as lists, the contexts and gold answers."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = pad_rows([r["input_ids"] for r in rows], self.pad_id)
        width = ids.shape[1]
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "start_positions": torch.tensor([r["start_positions"] for r in rows]),
            "end_positions": torch.tensor([r["end_positions"] for r in rows]),
        }
        if "offsets" in rows[0]:
            offsets = torch.full((len(rows), width, 2), -1, dtype=torch.long)
            for i, r in enumerate(rows):
                offsets[i, : len(r["offsets"])] = torch.tensor(r["offsets"])
            batch["offsets"] = offsets
            batch["contexts"] = [r["context"] for r in rows]
            batch["answers"] = [r["answers"] for r in rows]
        return batch


# ------------------------------------------------------------------------------ decoding
def best_spans(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    in_context: torch.Tensor,
    max_answer_tokens: int,
    top_k: int = 20,
) -> torch.Tensor:
    """(B, 2) token spans maximising start + end logit with start <= end < start +
    max_answer_tokens, both inside the context, among the top_k starts and ends of each row;
    (-1, -1) for a row where no such span exists."""
    low = torch.finfo(torch.float32).min
    start = start_logits.float().masked_fill(~in_context, low)
    end = end_logits.float().masked_fill(~in_context, low)
    k = min(top_k, start.shape[1])
    s_val, s_idx = start.topk(k, dim=1)  # (B, k)
    e_val, e_idx = end.topk(k, dim=1)
    length = e_idx[:, None, :] - s_idx[:, :, None]  # (B, k, k)
    ok = (length >= 0) & (length < max_answer_tokens)
    ok &= in_context.gather(1, s_idx)[:, :, None] & in_context.gather(1, e_idx)[:, None, :]
    scores = (s_val[:, :, None] + e_val[:, None, :]).masked_fill(~ok, float("-inf"))
    best = scores.flatten(1).argmax(dim=1, keepdim=True)  # (B, 1): index into k x k
    first, last = s_idx.gather(1, best // k), e_idx.gather(1, best % k)  # (B, 1) each
    spans = torch.cat([first, last], dim=1)
    return spans.masked_fill(scores.flatten(1).amax(dim=1, keepdim=True) == float("-inf"), -1)


def span_scores(start_logits: torch.Tensor, end_logits: torch.Tensor, spans: torch.Tensor):
    """start + end logit of each (start, end) span, -inf for (-1, -1)."""
    s, e = spans.clamp(min=0).unbind(dim=1)
    rows = torch.arange(spans.shape[0], device=spans.device)
    score = start_logits.float()[rows, s] + end_logits.float()[rows, e]
    return score.masked_fill(spans[:, 0] < 0, float("-inf"))


def span_texts(spans: torch.Tensor, offsets: torch.Tensor, contexts: Sequence[str]) -> list[str]:
    """The context text under each (start, end) token span ("" when outside the context),
    without the surrounding spaces byte-level BPE tokens carry in their offsets."""
    out = []
    for (s, e), off, context in zip(spans.tolist(), offsets.tolist(), contexts):
        a, b = (off[s][0], off[e][1]) if s >= 0 else (-1, -1)
        out.append(context[a:b].strip() if a >= 0 and b >= 0 else "")
    return out


# ------------------------------------------------------------------------------ metrics
def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation; an empty answer
    scores 1 only against an empty one (SQuAD v2's rule; v1.1 has no empty answers)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class AnswerScore(Metric):
    """Mean over examples of the best score against any gold answer (SQuAD's max over golds)."""

    def __init__(self, score) -> None:
        super().__init__()
        self.score = score
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> None:
        for prediction, answers in zip(predictions, golds):
            self.total += max(self.score(prediction, gold) for gold in answers)
        self.count += len(predictions)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(0.0)


def build_qa_metrics(names: Sequence[str]) -> dict[str, Metric]:
    bad = [m for m in names if m not in QA_METRICS]
    if bad:
        from flexbert import ConfigError

        raise ConfigError(
            f"task.metrics: {bad} do not apply to question_answering; choose from {QA_METRICS}"
        )
    scores = {"exact_match": exact_match, "f1": token_f1}
    return {m: AnswerScore(scores[m]) for m in names}


class ComposerFlexBertQA(FlexBertComposerModel):
    """Span loss from the head; evaluation decodes answers and scores them as text."""

    input_keys = QA_INPUTS

    def __init__(
        self,
        model: torch.nn.Module,
        metrics: Sequence[str],
        max_answer_tokens: int,
        allow_no_answer: bool = False,
    ) -> None:
        super().__init__(model)
        self.val_metrics = build_qa_metrics(metrics)
        self.max_answer_tokens = max_answer_tokens
        self.allow_no_answer = allow_no_answer

    def predicted_answers(self, batch: dict[str, Any], outputs: FlexBertOutput) -> list[str]:
        offsets = batch["offsets"]
        in_context = offsets[..., 0] >= 0  # (B, L)
        start, end = outputs.start_logits.detach(), outputs.end_logits.detach()
        spans = best_spans(start, end, in_context, self.max_answer_tokens)
        if self.allow_no_answer:  # "" where [CLS] scores above the best span (SQuAD v2)
            null = start[:, 0].float() + end[:, 0].float()
            spans = spans.masked_fill((null > span_scores(start, end, spans))[:, None], -1)
        return span_texts(spans, offsets, batch["contexts"])

    def update_metric(self, batch: dict[str, Any], outputs: FlexBertOutput, metric) -> None:
        metric.update(self.predicted_answers(batch, outputs), batch["answers"])
