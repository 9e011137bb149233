"""Extractive question answering (SQuAD-style): data, span decoding, metrics, Composer wrapper.

Rows hold a question, a context and `answers` as in SQuAD: `{"text": [...], "answer_start":
[...]}` (character offsets into the context). Each example becomes `[CLS] question [SEP]
context [SEP]`; a context longer than `data.max_seq_len` allows is read in overlapping windows
(`task.doc_stride` tokens shared by consecutive windows, as Hugging Face's run_qa does; null
truncates it instead). A training window that does not hold the whole answer targets [CLS].
Evaluation decodes each window's best span inside the context (start <= end, at most
`task.max_answer_tokens`) back to its text through the tokenizer's offsets, answers each
example with its highest-scoring window's span, and scores that against every gold answer with
SQuAD's exact match and F1 (lower case, no punctuation, articles or extra spaces). Examples
without an answer (SQuAD v2) need `task.allow_no_answer=true`: they target [CLS], and
evaluation answers "" when the lowest [CLS] score of the example's windows beats its best
span's, as SQuAD v2's evaluation does.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback
from torchmetrics import Metric

from flexbert.data.errors import DataError
from flexbert.outputs import FlexBertOutput
from flexbert.train.composer_model import FlexBertComposerModel
from flexbert.train.tasks import check_fields, pad_rows, text_column

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
    """text_fields = [question, context], label_field = answers -> one row per window (one per
    example unless `task.doc_stride` splits a long context) with the answer's token span and,
    `for_eval`, what decoding needs (its example's index, context offsets and gold texts: kept
    for the eval split only, they outweigh the ids)."""
    fields = list(task["text_fields"])
    if len(fields) != 2:
        raise DataError(
            f"task.text_fields: question answering needs [question, context], got {fields}"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("question answering needs a fast tokenizer (character offsets)")
    answer_field = task["label_field"]
    check_fields(ds, [*fields, answer_field], split)
    # leading spaces only cost room
    questions = [t.lstrip() for t in text_column(ds[fields[0]], split, fields[0])]
    contexts = text_column(ds[fields[1]], split, fields[1])
    answers = ds[answer_field]
    allow_no_answer = bool(task.get("allow_no_answer", False))
    stride = task.get("doc_stride")
    windows = {}
    if stride is not None:
        check_doc_stride(int(stride), questions, tokenizer, max_len, split)
        windows = {"stride": int(stride), "return_overflowing_tokens": True}
    try:
        enc = tokenizer(
            questions,
            contexts,
            truncation="only_second",
            max_length=max_len,
            return_offsets_mapping=True,
            **windows,
        )
    except Exception as e:  # noqa: BLE001 - a question longer than max_len, mostly
        raise DataError(
            f"split '{split}': could not fit question + context into data.max_seq_len="
            f"{max_len} ({e}); raise data.max_seq_len or shorten the questions"
        ) from e
    example_of = enc.get("overflow_to_sample_mapping", range(len(questions)))
    # what predictions are keyed by: the dataset's question ids (SQuAD's `id`), else row numbers
    has_ids = "id" in (getattr(ds, "column_names", None) or [])
    keys = [str(k) for k in ds["id"]] if has_ids else [str(i) for i in range(len(questions))]
    first_row: dict[str, int] = {}
    for i, key in enumerate(keys if for_eval else ()):
        if key in first_row:
            raise DataError(
                f"split '{split}': question id {key!r} is on rows {first_row[key]} and {i}; the "
                "answers (eval_predictions.json) are keyed by the id column, so ids must be unique"
            )
        first_row[key] = i
    char_spans: dict[int, tuple[int, int] | None] = {}
    rows = []
    for j, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        i = int(example_of[j])
        if i not in char_spans:
            where = f"split '{split}' row {i}"
            char_spans[i] = answer_char_span(answers[i], contexts[i], where, allow_no_answer)
        in_context = [s == 1 for s in enc.sequence_ids(j)]
        start, end = token_span(offsets, in_context, char_spans[i])
        row = {"input_ids": ids, "start_positions": start, "end_positions": end}
        if for_eval:
            row["example_id"] = i
            row["example_key"] = keys[i]
            row["offsets"] = [list(o) if c else [-1, -1] for o, c in zip(offsets, in_context)]
            row["context"] = contexts[i]
            row["answers"] = [str(t) for t in answers[i]["text"]] or [""]
        rows.append(row)
    return rows


def check_doc_stride(
    stride: int, questions: Sequence[str], tokenizer: Any, max_len: int, split: str
) -> None:
    """Windows must advance: the stride (overlap) has to be smaller than the context room
    that every question leaves in `max_len` (the tokenizer would abort the process)."""
    if stride < 0:
        raise DataError(f"task.doc_stride must be >= 0 (or null to truncate), got {stride}")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(q) for q in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    if not lengths:
        return
    i = max(range(len(lengths)), key=lengths.__getitem__)
    room = max_len - specials - lengths[i]
    if room <= 0:
        raise DataError(
            f"split '{split}' row {i}: its question takes {lengths[i]} tokens, leaving no room "
            f"for the context in data.max_seq_len={max_len}; raise data.max_seq_len"
        )
    if stride >= room:
        raise DataError(
            f"split '{split}' row {i}: its question takes {lengths[i]} tokens, leaving "
            f"{room} for the context in data.max_seq_len={max_len}, so windows sharing "
            f"task.doc_stride={stride} tokens cannot advance; lower task.doc_stride below "
            f"{room} or raise data.max_seq_len"
        )


class QACollator:
    """Padded ids and mask, the target spans and, for eval rows, each window's example index,
    each token's context offsets ((-1, -1) outside the context) and, as lists, the contexts
    and gold answers."""

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
            batch["example_ids"] = torch.tensor([r["example_id"] for r in rows])
            batch["example_keys"] = [r["example_key"] for r in rows]
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
    """Mean over examples of the answer's best score against any gold answer (SQuAD's max
    over golds). The answer of an example read in several windows is the span of its
    highest-scoring window, or "" when the example's lowest no-answer score beats that span's
    (Hugging Face's run_qa post-processing). Windows of one example may arrive in different
    batches or on different ranks: each window's candidate is kept (as tensors, gathered
    across ranks) and examples are formed in `compute`."""

    full_state_update = False

    def __init__(self, score) -> None:
        super().__init__()
        self.score = score
        for name in ("example_ids", "span_scores", "null_scores", "span_values", "empty_values"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # Every state is float64 (ids exact below 2**53): a rank without windows sends an
        # empty tensor of the metric's dtype, which must match the others' for the gather.
        self.set_dtype(torch.float64)

    def update(
        self,
        predictions: Sequence[str],
        golds: Sequence[Sequence[str]],
        example_ids: torch.Tensor,
        span_scores: torch.Tensor,
        null_scores: torch.Tensor | None = None,
    ) -> None:
        """One entry per window: its best span's text and score, its example's gold answers
        and index, and its no-answer ([CLS]) score (None: unanswerable is not an option)."""
        best = [max(self.score(p, g) for g in answers) for p, answers in zip(predictions, golds)]
        empty = [max(self.score("", g) for g in answers) for answers in golds]
        device, f64 = span_scores.device, torch.float64
        if null_scores is None:
            null_scores = torch.full_like(span_scores, float("-inf"))
        self.example_ids.append(example_ids.to(device=device, dtype=f64))
        self.span_scores.append(span_scores.to(f64))
        self.null_scores.append(null_scores.to(device=device, dtype=f64))
        self.span_values.append(torch.tensor(best, dtype=f64, device=device))
        self.empty_values.append(torch.tensor(empty, dtype=f64, device=device))

    def compute(self) -> torch.Tensor:
        from torchmetrics.utilities import dim_zero_cat

        # lists in one process; one tensor each after torchmetrics gathered the ranks
        ids = self.example_ids
        if isinstance(ids, list) and not ids:
            return torch.tensor(0.0)
        ids = dim_zero_cat(ids)
        if ids.numel() == 0:
            return torch.tensor(0.0)
        span, null = dim_zero_cat(self.span_scores), dim_zero_cat(self.null_scores)
        span_values, empty_values = dim_zero_cat(self.span_values), dim_zero_cat(self.empty_values)
        chosen, empty = select_answers(ids.long(), span, null)
        values = torch.where(empty, empty_values[chosen], span_values[chosen])
        return values.mean().float()


def select_answers(
    example_ids: torch.Tensor, span_scores: torch.Tensor, null_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (in increasing id order): the first of its windows holding its best span,
    and whether it answers "" (its lowest no-answer score beats that span: run_qa's rule)."""
    _, example = torch.unique(example_ids, return_inverse=True)
    n, device = int(example.max()) + 1, example_ids.device
    windows = torch.arange(len(example_ids), device=device)
    null_scores = null_scores.to(span_scores.dtype)
    low = torch.full((n,), float("-inf"), device=device, dtype=span_scores.dtype)
    best = low.scatter_reduce(0, example, span_scores, "amax")
    chosen = torch.full((n,), len(example_ids), device=device).scatter_reduce(
        0, example, windows.masked_fill(span_scores < best[example], len(example_ids)), "amin"
    )
    lowest_null = (-low).scatter_reduce(0, example, null_scores, "amin")
    return chosen, lowest_null > best


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

    def window_answers(
        self, batch: dict[str, Any], outputs: FlexBertOutput
    ) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        """Each window's best span as text, that span's score (-inf when none fits) and, with
        `allow_no_answer`, its [CLS] (no-answer) score."""
        offsets = batch["offsets"]
        in_context = offsets[..., 0] >= 0  # (B, L)
        start, end = outputs.start_logits.detach(), outputs.end_logits.detach()
        spans = best_spans(start, end, in_context, self.max_answer_tokens)
        null = start[:, 0].float() + end[:, 0].float() if self.allow_no_answer else None
        return span_texts(spans, offsets, batch["contexts"]), span_scores(start, end, spans), null

    def predicted_answers(self, batch: dict[str, Any], outputs: FlexBertOutput) -> list[str]:
        """Each window's answer on its own: "" where [CLS] beats the best span (SQuAD v2)."""
        texts, scores, null = self.window_answers(batch, outputs)
        if null is None:
            return texts
        return [t if n <= s else "" for t, s, n in zip(texts, scores.tolist(), null.tolist())]

    def update_metric(self, batch: dict[str, Any], outputs: FlexBertOutput, metric) -> None:
        texts, scores, null = self.window_answers(batch, outputs)
        metric.update(texts, batch["answers"], batch["example_ids"], scores, null)


class QAPredictions(Callback):
    """Writes each evaluation's answers to `path` as {question id: answer text} (the layout
    of SQuAD's predictions.json, which its official evaluation script reads; ids are the
    dataset's `id` column, else row numbers), chosen across windows as the metrics choose.
    Every rank's windows are gathered; the main process writes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.windows: list[tuple[int, float, float, str, str]] = []

    def eval_start(self, state: Any, logger: Any) -> None:
        self.windows = []

    def eval_after_forward(self, state: Any, logger: Any) -> None:
        batch = state.batch
        if "offsets" not in batch:
            return
        wrapper = getattr(state.model, "module", state.model)  # DDP wraps the Composer model
        texts, scores, null = wrapper.window_answers(batch, state.outputs)
        nulls = null.tolist() if null is not None else [float("-inf")] * len(texts)
        ids, keys = batch["example_ids"].tolist(), batch["example_keys"]
        self.windows += list(zip(ids, scores.tolist(), nulls, texts, keys))

    def eval_end(self, state: Any, logger: Any) -> None:
        from flexbert.data.distributed import gather_objects, rank_and_world

        windows = [w for part in gather_objects(self.windows) for w in part]
        if rank_and_world()[0] != 0 or not windows:
            return
        ids, span, null = (torch.tensor([w[k] for w in windows]) for k in range(3))
        chosen, empty = select_answers(ids, span.float(), null.float())
        answers = {
            windows[c][4]: "" if e else windows[c][3]
            for c, e in zip(chosen.tolist(), empty.tolist())
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
