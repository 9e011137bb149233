"""flexbert-finetune for each task type beyond sequence classification: regression, token
classification, retrieval and multiple choice, end to end on small files made here."""

from __future__ import annotations

import json
import random

import pytest
import torch

from flexbert.train.finetune import train
from tests.train.test_finetune import (  # noqa: F401 - module fixtures
    FAST,
    KEY,
    WORDS,
    _compose,
    _files,
    _sentences,
    _write_jsonl,
    contains_word,
    pretrained,
)


def test_regression_reports_pearson(pretrained, tmp_path):  # noqa: F811
    rng = random.Random(2)
    files = {}
    for split, n in (("train", 96), ("validation", 48)):
        rows = [
            {"a": " ".join(s[:2]), "b": " ".join(s[2:]), "label": s.count(KEY) / len(s)}
            for s in _sentences(rng, n)
        ]
        files[split] = _write_jsonl(tmp_path / f"{split}.jsonl", rows)
    cfg = _compose(
        [f"model.path={pretrained}", "task=local_regression", *_files(files), *FAST]
        + ["trainer.max_duration=1ep", "task.text_fields=[a,b]"]  # sentence pairs
    )
    summary = train(cfg, tmp_path / "run")
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(tmp_path / "run" / "hf")
    assert hf_cfg.num_labels == 1 and hf_cfg.problem_type == "regression"
    assert {"pearson", "spearman"} == set(summary["eval"])
    assert (tmp_path / "run" / "hf" / "config.json").exists()


def test_token_classification_runs_on_word_labels(pretrained, tmp_path):  # noqa: F811
    rng = random.Random(3)
    files = {}
    for split, n in (("train", 96), ("validation", 32)):
        rows = [{"tokens": s, "tags": [int(w == KEY) for w in s]} for s in _sentences(rng, n)]
        files[split] = _write_jsonl(tmp_path / f"{split}.jsonl", rows)
    cfg = _compose(
        [f"model.path={pretrained}", "task=local_token_classification", *_files(files), *FAST]
        + ["trainer.max_duration=1ep"]
    )
    summary = train(cfg, tmp_path / "run")
    assert {"accuracy", "entity_f1"} == set(summary["eval"])
    assert summary["eval"]["accuracy"] > 0.5
    hf_cfg = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["ModernBertForTokenClassification"]


def test_retrieval_trains_on_pairs_and_exports_the_encoder(pretrained, tmp_path):  # noqa: F811
    from transformers import AutoModel

    rng = random.Random(4)
    files = {}
    for split, n in (("train", 64), ("validation", 32)):
        rows = [{"query": " ".join(s), "positive": " ".join(s[::-1])} for s in _sentences(rng, n)]
        files[split] = _write_jsonl(tmp_path / f"{split}.jsonl", rows)
    cfg = _compose(
        [f"model.path={pretrained}", "task=local_retrieval", *_files(files), *FAST]
        + ["trainer.max_duration=1ep"]
    )
    summary = train(cfg, tmp_path / "run")
    ev = summary["eval"]
    assert set(ev) >= {"ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_10"}
    assert (
        0.0 <= ev["recall_at_1"] <= ev["mrr_at_10"] <= ev["ndcg_at_10"] <= ev["recall_at_10"] <= 1
    )
    assert summary["eval_best"]["metric"] == "ndcg_at_10"
    assert type(AutoModel.from_pretrained(tmp_path / "run" / "hf")).__name__ == "ModernBertModel"
    st = pytest.importorskip("sentence_transformers")
    from flexbert import FlexBertForSentenceEmbedding
    from flexbert.data.tokenizer import load_tokenizer

    texts = [" ".join(s) for s in _sentences(random.Random(9), 3)]
    vectors = st.SentenceTransformer(str(tmp_path / "run" / "hf"), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    enc = load_tokenizer(tmp_path / "run" / "hf")(texts, padding=True, return_tensors="pt")
    ours = FlexBertForSentenceEmbedding.from_hf(tmp_path / "run" / "hf").eval()
    with torch.no_grad():
        expected = ours.embed(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(vectors, expected, rtol=1e-4, atol=1e-4)


def test_word_labels_sit_on_the_first_sub_token(pretrained):  # noqa: F811
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.tasks import encode_tokens

    tok = load_tokenizer(pretrained)
    task = {"text_fields": ["tokens"], "label_field": "tags"}
    ds = _Rows({"tokens": [["xyzzyq", KEY]], "tags": [[1, 0]]})
    (row,) = encode_tokens(ds, task, tok, 64, "train", int)
    word = tok("xyzzyq", add_special_tokens=False)["input_ids"]
    assert len(word) > 1 and row["labels"][: len(word) + 2] == [-100, 1] + [-100] * (
        len(word) - 1
    ) + [0]


class _Rows(dict):
    """The slice of a datasets.Dataset that the encoders use."""

    @property
    def column_names(self) -> list[str]:
        return list(self)


def test_one_label_per_row_for_token_classification_is_a_clear_error(pretrained, tmp_path):  # noqa: F811
    from flexbert.data.errors import DataError

    rows = [{"tokens": ["apple", KEY], "tags": 1}, {"tokens": ["river"], "tags": 0}]
    files = {s: _write_jsonl(tmp_path / f"{s}.jsonl", rows) for s in ("train", "validation")}
    cfg = _compose(
        [f"model.path={pretrained}", "task=local_token_classification", *_files(files), *FAST]
    )
    with pytest.raises(DataError, match=r"field 'tags' holds 1 \(int\).*a list of labels"):
        train(cfg, tmp_path / "run")


@pytest.mark.slow
def test_gathered_negatives_on_two_ranks_equal_one_process_with_the_whole_batch(two_ranks):
    """Two processes (gloo), 3 pairs each, gathering every rank's positives: DDP-averaged
    gradients and the mean loss equal one process scoring 6 queries against 6 positives."""
    from tests.train.conftest import assert_every_rank_took_this_step
    from tests.train.two_rank_worker import embedding_batch, embedding_model

    model, (queries, positives) = embedding_model(), embedding_batch()
    out = model(queries, candidates=(positives, None))
    out.loss.backward()
    assert_every_rank_took_this_step(two_ranks("negatives"), out.loss, model)
    # without gathering, each rank would see 3 candidates and a different loss
    local = model(queries[:3], candidates=(positives[:3], None)).loss.detach()
    assert not torch.allclose(local, out.loss.detach())


def test_multiple_choice_trains_evaluates_and_exports(pretrained, tmp_path):  # noqa: F811
    """Pick the choice that repeats the context's KEY word; the export scores like ours."""
    from transformers import AutoModelForMultipleChoice

    from flexbert import FlexBertForMultipleChoice
    from flexbert.train.tasks import ChoiceCollator

    rng = random.Random(5)
    files = {}
    for split, n in (("train", 96), ("validation", 32)):
        rows = []
        for words in _sentences(rng, n):
            answer = rng.randrange(3)
            choices = [" ".join(rng.sample(WORDS, 3)) for _ in range(3)]
            choices[answer] += f" {KEY}"
            rows.append(
                {"context": " ".join([*words, KEY]), "lead": "it is", "label": answer}
                | {f"c{i}": c for i, c in enumerate(choices)}
            )
        files[split] = _write_jsonl(tmp_path / f"{split}.jsonl", rows)
    cfg = _compose(
        [f"model.path={pretrained}", "task=local_multiple_choice", *_files(files), *FAST]
        + ["task.text_fields=[context,c0,c1,c2]", "task.num_labels=3", "task.choice_prefix=lead"]
        + ["trainer.max_duration=1ep"]
    )
    summary = train(cfg, tmp_path / "run")
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0 and summary["train"]["batches"] > 0
    hf_dir = tmp_path / "run" / "hf"
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == [
        "ModernBertForMultipleChoice"
    ]
    ours = FlexBertForMultipleChoice.from_hf(hf_dir).eval()
    theirs = AutoModelForMultipleChoice.from_pretrained(hf_dir).eval()
    batch = ChoiceCollator(0)([{"input_ids": [[1, 5, 6, 2, 7, 2], [1, 5, 2, 9, 2]], "labels": 0}])
    with torch.no_grad():
        a = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_multiple_choice_needs_one_label_per_choice_field(pretrained, tmp_path):  # noqa: F811
    from flexbert.data.errors import DataError
    from flexbert.train.tasks import encode_choices

    task = {"text_fields": ["q", "a", "b"], "num_labels": 3, "label_field": "label"}
    with pytest.raises(DataError, match=r"num_labels=3 must equal the number of choice fields \(2"):
        encode_choices(
            {"q": ["x"], "a": ["y"], "b": ["z"], "label": [0]}, task, None, 16, "train", int
        )
