"""Extractive question answering: answer spans to tokens and back, SQuAD scores, and a run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from flexbert.data.errors import DataError
from flexbert.train.finetune_qa import (
    QACollator,
    answer_char_span,
    best_spans,
    build_qa_metrics,
    encode_questions,
    exact_match,
    normalize_answer,
    token_f1,
)
from tests.train.finetune_helpers import FAST, WORDS, compose_finetune, write_jsonl

TASK = {"text_fields": ["question", "context"], "label_field": "answers"}


def _example(rng: random.Random, n_words: int = 12) -> dict:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    at = rng.randrange(2, n_words - 2)
    answer = " ".join(words[at : at + rng.randint(1, 2)])
    before = " ".join(words[:at]) + " "
    context = before + " ".join(words[at:])
    return {
        "question": f"where is {words[at]}",
        "context": context,
        "answers": {"text": [answer], "answer_start": [len(before)]},
    }


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def _columns(rows: list[dict]) -> dict:
    return {k: [r[k] for r in rows] for k in rows[0]}


class _Split(dict):  # what encode_questions reads of a datasets.Dataset
    @property
    def column_names(self):
        return list(self)


@pytest.fixture(scope="module")
def tokenizer(pretrained):
    from flexbert.data.tokenizer import load_tokenizer

    return load_tokenizer(pretrained)


def test_oracle_logits_decode_every_gold_answer(tokenizer):
    """Encoding maps each answer to tokens; logits peaked on those tokens decode, through the
    collator's offsets, back to exactly the answer text: the whole span path round-trips."""
    from flexbert.outputs import FlexBertOutput
    from flexbert.train.finetune_qa import ComposerFlexBertQA

    rows = _rows(24, seed=1)
    encoded = encode_questions(_Split(_columns(rows)), TASK, tokenizer, 64, "validation", True)
    batch = QACollator(tokenizer.pad_token_id)(encoded)
    assert (batch["start_positions"] > 0).all() and (
        batch["end_positions"] >= batch["start_positions"]
    ).all()
    width = batch["input_ids"].shape[1]
    start = torch.nn.functional.one_hot(batch["start_positions"], width).float() * 10
    end = torch.nn.functional.one_hot(batch["end_positions"], width).float() * 10
    outputs = FlexBertOutput(start_logits=start, end_logits=end)
    wrapper = ComposerFlexBertQA(torch.nn.Linear(1, 1), ["exact_match", "f1"], 30)
    predicted = wrapper.predicted_answers(batch, outputs)
    assert predicted == [r["answers"]["text"][0] for r in rows]
    for metric in wrapper.val_metrics.values():
        wrapper.update_metric(batch, outputs, metric)
        assert metric.compute().item() == 1.0
    # shifted one token later, the decoded answers are wrong and the scores drop
    wrapper = ComposerFlexBertQA(torch.nn.Linear(1, 1), ["exact_match"], 30)
    late = FlexBertOutput(start_logits=start.roll(1, 1), end_logits=end.roll(1, 1))
    wrapper.update_metric(batch, late, wrapper.val_metrics["exact_match"])
    assert wrapper.val_metrics["exact_match"].compute().item() < 0.5


def test_answers_cut_off_by_truncation_target_cls(tokenizer):
    row = _rows(1, seed=2)[0]
    prefix = "apple " * 80
    row["context"] = prefix + row["context"]
    row["answers"]["answer_start"] = [row["answers"]["answer_start"][0] + len(prefix)]
    (encoded,) = encode_questions(_Split(_columns([row])), TASK, tokenizer, 32, "train")
    assert len(encoded["input_ids"]) == 32
    assert (encoded["start_positions"], encoded["end_positions"]) == (0, 0)
    # training rows carry no evaluation fields (offsets, context, answers), nor their batches
    assert set(encoded) == {"input_ids", "start_positions", "end_positions"}
    assert "offsets" not in QACollator(0)([encoded])


def _long_rows(n: int, seed: int, n_words: int = 60) -> list[dict]:
    rng = random.Random(seed)
    return [_example(rng, n_words) for _ in range(n)]


def _oracle(batch: dict, scale: float = 10.0):
    """Logits peaked on each window's target span ([CLS] where the window lacks the answer)."""
    from flexbert.outputs import FlexBertOutput

    width = batch["input_ids"].shape[1]
    start = torch.nn.functional.one_hot(batch["start_positions"], width).float() * scale
    end = torch.nn.functional.one_hot(batch["end_positions"], width).float() * scale
    return FlexBertOutput(start_logits=start, end_logits=end)


def test_long_contexts_are_read_in_overlapping_windows(tokenizer):
    """With task.doc_stride every context token lands in some window, consecutive windows
    share exactly doc_stride tokens, and only the windows holding the whole answer target it
    (the others target [CLS])."""
    rows = _long_rows(6, seed=7)
    task = {**TASK, "doc_stride": 8}
    encoded = encode_questions(_Split(_columns(rows)), task, tokenizer, 32, "validation", True)
    assert len(encoded) > 2 * len(rows)  # 60 words do not fit in 32 tokens
    assert max(len(r["input_ids"]) for r in encoded) == 32
    for i, row in enumerate(rows):
        windows = [r for r in encoded if r["example_id"] == i]
        assert len(windows) >= 2
        spans = [[tuple(o) for o in w["offsets"] if o[0] >= 0] for w in windows]
        for a, b in zip(spans, spans[1:]):
            assert a[-8:] == b[:8]  # the stride: the next window starts 8 tokens back
        whole = tokenizer(row["context"], add_special_tokens=False, return_offsets_mapping=True)
        covered = sorted({o for span in spans for o in span})
        assert covered == [tuple(o) for o in whole["offset_mapping"]]
        a0 = row["answers"]["answer_start"][0]
        a1 = a0 + len(row["answers"]["text"][0])
        for w, span in zip(windows, spans):
            holds = span[0][0] <= a0 and a1 <= span[-1][1]
            assert (w["start_positions"] > 0) == holds
            if holds:
                s, e = w["start_positions"], w["end_positions"]
                text = row["context"][w["offsets"][s][0] : w["offsets"][e][1]].strip()
                assert text == row["answers"]["text"][0]
        assert any(w["start_positions"] > 0 for w in windows)


def test_each_example_is_answered_by_its_best_window_across_batches(tokenizer):
    """Oracle logits on every window: the windows without the answer predict a wrong span
    with a lower score, so only an example-level choice scores 1.0; and the windows of one
    example are split over batches (as over ranks), which must not change the result."""
    from flexbert.train.finetune_qa import ComposerFlexBertQA

    rows = _long_rows(6, seed=8)
    task = {**TASK, "doc_stride": 8}
    encoded = encode_questions(_Split(_columns(rows)), task, tokenizer, 32, "validation", True)
    wrapper = ComposerFlexBertQA(torch.nn.Linear(1, 1), ["exact_match", "f1"], 30)
    per_window = []
    for half in (encoded[: len(encoded) // 2 + 1], encoded[len(encoded) // 2 + 1 :]):
        batch = QACollator(tokenizer.pad_token_id)(half)
        outputs = _oracle(batch)
        # a window without the answer: a weak (score 2) guess on its first context token
        lacking = batch["start_positions"] == 0
        first = (batch["offsets"][..., 0] >= 0).int().argmax(dim=1)
        rows_idx = torch.arange(len(half))[lacking]
        outputs.start_logits[rows_idx, first[lacking]] = 1.0
        outputs.end_logits[rows_idx, first[lacking]] = 1.0
        per_window += wrapper.predicted_answers(batch, outputs)
        for metric in wrapper.val_metrics.values():
            wrapper.update_metric(batch, outputs, metric)
    gold = [rows[r["example_id"]]["answers"]["text"][0] for r in encoded]
    assert 0 < sum(p == g for p, g in zip(per_window, gold)) < len(encoded)
    for metric in wrapper.val_metrics.values():
        assert metric.compute().item() == 1.0


def test_no_answer_across_windows_uses_the_lowest_null_score():
    """SQuAD v2 over windows (run_qa's rule): "" only when the example's lowest [CLS] score
    beats its best span; windows repeated (as a distributed sampler pads) count once."""
    metric = build_qa_metrics(["exact_match"])["exact_match"]
    golds = [["river"], ["river"], ["bank"], ["bank"]]
    ids = torch.tensor([0, 0, 1, 1])
    spans = torch.tensor([3.0, 9.0, 4.0, 2.0])
    # example 0: best span 9 (window 1: "river") vs lowest null 5 (not 20) -> "river"
    # example 1: best span 4 vs lowest null 3 -> "bank", although window 3's null 8 beats 4
    nulls = torch.tensor([20.0, 5.0, 3.0, 8.0])
    metric.update(["bank", "river", "bank", "x"], golds, ids, spans, nulls)
    assert metric.compute().item() == 1.0
    metric.update(["bank"], [["river"]], torch.tensor([0]), torch.tensor([3.0]), nulls[:1])
    assert metric.compute().item() == 1.0  # example 0 again (a padded sampler): 2 examples
    metric.reset()
    metric.update(["bank", "x"], [[""], [""]], torch.tensor([1, 1]), spans[2:], nulls[2:] + 2)
    assert metric.compute().item() == 1.0  # lowest null 5 > best span 4: ""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["split", "empty"])
def test_answer_scores_gather_the_windows_of_every_rank(two_ranks, case):
    """Two processes (gloo): example 0's best window is on the other rank ("split"), or one
    rank has no window at all ("empty"); every rank computes the same, right score."""
    scores = [s.item() for s in two_ranks(case)]
    # split: "river" (score 7, rank 1) beats "bank" (1, rank 0) for example 0: both right.
    # empty: only rank 0's windows: "bank" is wrong, "shore" right.
    assert scores == ([1.0, 1.0] if case == "split" else [0.5, 0.5])


def test_a_doc_stride_that_cannot_advance_is_one_clear_error(tokenizer):
    rows = _rows(3, seed=9)
    rows[1]["question"] = "where is " + " ".join(["apple"] * 12)
    task = {**TASK, "doc_stride": 16}
    with pytest.raises(DataError, match=r"row 1: its question takes .*task.doc_stride=16"):
        encode_questions(_Split(_columns(rows)), task, tokenizer, 32, "train")
    with pytest.raises(DataError, match="doc_stride must be >= 0"):
        encode_questions(_Split(_columns(rows)), {**TASK, "doc_stride": -1}, tokenizer, 32, "x")
    rows[1]["question"] = "where is " + " ".join(["apple"] * 40)  # longer than the sequence
    with pytest.raises(DataError, match=r"row 1: .* leaving no room for the context"):
        encode_questions(_Split(_columns(rows)), task, tokenizer, 32, "train")


def test_a_question_that_fills_the_sequence_is_one_clear_error(tokenizer):
    row = _rows(1, seed=2)[0]
    row["question"] = " ".join(["where"] * 40)
    with pytest.raises(DataError, match="data.max_seq_len=16"):
        encode_questions(_Split(_columns([row])), TASK, tokenizer, 16, "train")


def test_duplicate_question_ids_in_the_eval_split_are_refused(tokenizer):
    rows = [{"id": f"q{i}", **r} for i, r in enumerate(_rows(4, seed=10))]
    rows[3]["id"] = "q1"
    split = _Split(_columns(rows))
    with pytest.raises(DataError, match="question id 'q1' is on rows 1 and 3"):
        encode_questions(split, TASK, tokenizer, 64, "validation", for_eval=True)
    assert len(encode_questions(split, TASK, tokenizer, 64, "train")) == 4  # training: fine


def test_an_answer_not_at_its_offset_is_refused():
    with pytest.raises(DataError, match=r"row 3: answer 'river' is not at answer_start=0"):
        answer_char_span({"text": ["river"], "answer_start": [0]}, "the river", "row 3")
    with pytest.raises(DataError, match="answers must be"):
        answer_char_span(["river"], "the river", "row 0")
    with pytest.raises(DataError, match="row 0: no answer.*allow_no_answer=true"):
        answer_char_span({"text": [], "answer_start": []}, "the river", "row 0")
    assert answer_char_span({"text": [], "answer_start": []}, "the river", "row 0", True) is None


def test_best_span_respects_order_length_and_context():
    start = torch.tensor([[0.0, 9.0, 1.0, 0.0, 5.0, 0.0]])
    end = torch.tensor([[8.0, 0.0, 0.0, 4.0, 0.0, 7.0]])
    context = torch.tensor([[False, True, True, True, True, True]])
    # best pair is start 1 .. end 5 (9 + 7); token 0 (end 8) lies outside the context
    assert best_spans(start, end, context, 30).tolist() == [[1, 5]]
    # at most 3 tokens: 1 .. 3 (9 + 4)
    assert best_spans(start, end, context, 3).tolist() == [[1, 3]]
    # at most 2 tokens: start 4 .. end 5 (5 + 7)
    assert best_spans(start, end, context, 2).tolist() == [[4, 5]]
    # an end before its start is never chosen, however high: 3 .. 3 (9 + 0), not 3 .. 1
    backwards = best_spans(
        torch.tensor([[0.0, 0.0, 0.0, 9.0]]),
        torch.tensor([[0.0, 9.0, 0.0, 0.0]]),
        torch.ones(1, 4, dtype=torch.bool),
        30,
    )
    assert backwards.tolist() == [[3, 3]]
    # no valid span among the candidates: (-1, -1), which decodes to ""
    assert best_spans(start, end, context, 2, top_k=1).tolist() == [[-1, -1]]


def test_no_answer_is_predicted_only_when_allowed_and_cls_wins(tokenizer):
    from flexbert.outputs import FlexBertOutput
    from flexbert.train.finetune_qa import ComposerFlexBertQA

    rows = _rows(2, seed=6)
    task = {**TASK, "allow_no_answer": True}
    encoded = encode_questions(_Split(_columns(rows)), task, tokenizer, 64, "validation", True)
    batch = QACollator(0)(encoded)
    width = batch["input_ids"].shape[1]
    start = torch.nn.functional.one_hot(batch["start_positions"], width).float() * 5
    end = torch.nn.functional.one_hot(batch["end_positions"], width).float() * 5
    start[0, 0] = end[0, 0] = 6.0  # row 0: [CLS] beats its span (12 > 10); row 1: it does not
    outputs = FlexBertOutput(start_logits=start, end_logits=end)
    gold = [r["answers"]["text"][0] for r in rows]
    allowed = ComposerFlexBertQA(torch.nn.Linear(1, 1), ["f1"], 30, allow_no_answer=True)
    assert allowed.predicted_answers(batch, outputs) == ["", gold[1]]
    plain = ComposerFlexBertQA(torch.nn.Linear(1, 1), ["f1"], 30)
    assert plain.predicted_answers(batch, outputs) == gold


def test_squad_scores_match_the_official_definitions():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Eiffel Tower", "Eiffel Tower.") == 1.0
    assert token_f1("in the Eiffel Tower", "Eiffel Tower") == pytest.approx(
        2 * (2 / 3) * 1 / (2 / 3 + 1)
    )
    assert token_f1("Paris", "Eiffel Tower") == 0.0
    metric = build_qa_metrics(["f1"])["f1"]
    golds = [["Eiffel Tower", "Eiffel"], ["London"]]
    metric.update(["Eiffel", "Paris"], golds, torch.tensor([0, 1]), torch.zeros(2))  # best gold
    assert metric.compute().item() == pytest.approx(0.5)
    with pytest.raises(Exception, match="do not apply to question_answering"):
        build_qa_metrics(["accuracy"])


def test_question_answering_trains_evaluates_and_exports(pretrained, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    from flexbert import FlexBertForQuestionAnswering
    from flexbert.train.finetune import train

    validation = [{"id": f"q{i}", **r} for i, r in enumerate(_long_rows(16, 4, 30))]
    files = {  # validation contexts outgrow data.max_seq_len=32: read in windows
        "train": write_jsonl(
            tmp_path / "train.jsonl", [{"id": f"t{i}", **r} for i, r in enumerate(_rows(64, 3))]
        ),
        "validation": write_jsonl(tmp_path / "validation.jsonl", validation),
    }
    overrides = [f"task.dataset.files.{k}={v}" for k, v in files.items()]
    overrides.append("task.doc_stride=8")
    cfg = compose_finetune(
        [f"model.path={pretrained}", "task=local_question_answering", *overrides, *FAST]
        + ["trainer.max_duration=2ep"]
    )
    summary = train(cfg, tmp_path / "run")
    assert set(summary["eval"]) == {"exact_match", "f1"}
    assert 0.0 <= summary["eval"]["exact_match"] <= summary["eval"]["f1"] <= 1.0
    assert summary["train"]["loss_last"] < summary["train"]["loss_first"]
    # the last evaluation's answers by question id, scoring exactly what the metrics reported
    predictions = json.loads((tmp_path / "run" / "eval_predictions.json").read_text())
    assert list(predictions) == [r["id"] for r in validation]
    scores = {
        name: sum(score(predictions[r["id"]], r["answers"]["text"][0]) for r in validation) / 16
        for name, score in (("exact_match", exact_match), ("f1", token_f1))
    }
    assert scores == pytest.approx(summary["eval"], abs=1e-6)
    assert summary["paths"]["predictions"].endswith("eval_predictions.json")
    counts = summary["data"]["examples"]  # eval rows are windows; 16 questions behind them
    assert counts["eval_examples"] == 16 < counts["eval"]
    from flexbert.train.finetune import report

    assert "AutoModelForQuestionAnswering.from_pretrained" in report(summary)
    hf_dir = tmp_path / "run" / "hf"
    architectures = json.loads((hf_dir / "config.json").read_text())["architectures"]
    assert architectures == ["ModernBertForQuestionAnswering"]
    ours = FlexBertForQuestionAnswering.from_hf(hf_dir).eval()
    theirs = AutoModelForQuestionAnswering.from_pretrained(hf_dir).eval()
    ids = torch.tensor([[1, 5, 6, 2, 7, 8, 9, 2]])
    with torch.no_grad():
        a, b = ours(ids).start_logits, theirs(input_ids=ids).start_logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # flexbert-export makes the same question-answering model from the last checkpoint
    from flexbert.train.export import main as export_main

    assert export_main([summary["paths"]["last_checkpoint"], "--out", str(tmp_path / "x")]) == 0
    exported = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "x").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).start_logits, b)


@pytest.mark.parametrize("field, value", [("question", None), ("context", None), ("context", "")])
def test_a_null_or_empty_question_or_context_is_refused(tokenizer, field, value):
    rows = _rows(3, seed=11)
    rows[2][field] = value
    with pytest.raises(DataError, match=rf"split 'train' row 2: field '{field}' is empty"):
        encode_questions(_Split(_columns(rows)), TASK, tokenizer, 64, "train")
