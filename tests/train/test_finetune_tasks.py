"""flexbert-finetune for each task type beyond sequence classification: regression, token
classification, retrieval and multiple choice, end to end on small files made here."""

from __future__ import annotations

import json
import random

import pytest
import torch

from flexbert.train.finetune import train
from tests.train.finetune_helpers import (
    FAST,
    KEY,
    WORDS,
    compose_finetune,
    file_overrides,
    random_sentences,
    write_jsonl,
)


def test_regression_reports_pearson(pretrained, tmp_path):
    rng = random.Random(2)
    files = {}
    for split, n in (("train", 96), ("validation", 48)):
        rows = [
            {"a": " ".join(s[:2]), "b": " ".join(s[2:]), "label": s.count(KEY) / len(s)}
            for s in random_sentences(rng, n)
        ]
        files[split] = write_jsonl(tmp_path / f"{split}.jsonl", rows)
    cfg = compose_finetune(
        [f"model.path={pretrained}", "task=local_regression", *file_overrides(files), *FAST]
        + ["trainer.max_duration=1ep", "task.text_fields=[a,b]"]  # sentence pairs
    )
    summary = train(cfg, tmp_path / "run")
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(tmp_path / "run" / "hf")
    assert hf_cfg.num_labels == 1 and hf_cfg.problem_type == "regression"
    assert {"pearson", "spearman"} == set(summary["eval"])
    assert (tmp_path / "run" / "hf" / "config.json").exists()


def test_token_classification_runs_on_word_labels(pretrained, tmp_path):
    rng = random.Random(3)
    files = {}
    for split, n in (("train", 96), ("validation", 32)):
        rows = [{"tokens": s, "tags": [int(w == KEY) for w in s]} for s in random_sentences(rng, n)]
        files[split] = write_jsonl(tmp_path / f"{split}.jsonl", rows)
    cfg = compose_finetune(
        [
            f"model.path={pretrained}",
            "task=local_token_classification",
            *file_overrides(files),
            *FAST,
        ]
        + ["trainer.max_duration=1ep"]
    )
    summary = train(cfg, tmp_path / "run")
    assert {"accuracy", "entity_f1"} == set(summary["eval"])
    assert summary["eval"]["accuracy"] > 0.5
    hf_cfg = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["ModernBertForTokenClassification"]


def test_retrieval_trains_on_pairs_and_exports_the_encoder(pretrained, tmp_path):
    from transformers import AutoModel

    rng = random.Random(4)
    files = {}
    for split, n in (("train", 64), ("validation", 32)):
        rows = [
            {"query": " ".join(s), "positive": " ".join(s[::-1])} for s in random_sentences(rng, n)
        ]
        files[split] = write_jsonl(tmp_path / f"{split}.jsonl", rows)
    cfg = compose_finetune(
        [f"model.path={pretrained}", "task=local_retrieval", *file_overrides(files), *FAST]
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

    texts = [" ".join(s) for s in random_sentences(random.Random(9), 3)]
    vectors = st.SentenceTransformer(str(tmp_path / "run" / "hf"), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    enc = load_tokenizer(tmp_path / "run" / "hf")(texts, padding=True, return_tensors="pt")
    ours = FlexBertForSentenceEmbedding.from_hf(tmp_path / "run" / "hf").eval()
    with torch.no_grad():
        expected = ours.embed(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(vectors, expected, rtol=1e-4, atol=1e-4)


def test_word_labels_sit_on_the_first_sub_token(pretrained):
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


def test_one_label_per_row_for_token_classification_is_a_clear_error(pretrained, tmp_path):
    from flexbert.data.errors import DataError

    rows = [{"tokens": ["apple", KEY], "tags": 1}, {"tokens": ["river"], "tags": 0}]
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", rows) for s in ("train", "validation")}
    cfg = compose_finetune(
        [
            f"model.path={pretrained}",
            "task=local_token_classification",
            *file_overrides(files),
            *FAST,
        ]
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


def test_multiple_choice_trains_evaluates_and_exports(pretrained, tmp_path):
    """Pick the choice that repeats the context's KEY word; the export scores like ours."""
    from transformers import AutoModelForMultipleChoice

    from flexbert import FlexBertForMultipleChoice
    from flexbert.train.tasks import ChoiceCollator

    rng = random.Random(5)
    files = {}
    for split, n in (("train", 96), ("validation", 32)):
        rows = []
        for words in random_sentences(rng, n):
            answer = rng.randrange(3)
            choices = [" ".join(rng.sample(WORDS, 3)) for _ in range(3)]
            choices[answer] += f" {KEY}"
            rows.append(
                {"context": " ".join([*words, KEY]), "lead": "it is", "label": answer}
                | {f"c{i}": c for i, c in enumerate(choices)}
            )
        files[split] = write_jsonl(tmp_path / f"{split}.jsonl", rows)
    cfg = compose_finetune(
        [f"model.path={pretrained}", "task=local_multiple_choice", *file_overrides(files), *FAST]
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


def test_multiple_choice_needs_one_label_per_choice_field(pretrained, tmp_path):
    from flexbert.data.errors import DataError
    from flexbert.train.tasks import encode_choices

    task = {"text_fields": ["q", "a", "b"], "num_labels": 3, "label_field": "label"}
    with pytest.raises(DataError, match=r"num_labels=3 must equal the number of choice fields \(2"):
        encode_choices(
            {"q": ["x"], "a": ["y"], "b": ["z"], "label": [0]}, task, None, 16, "train", int
        )


def _task(files: dict, **overrides) -> dict:
    """A sequence classification task over local files, as build_examples reads it."""
    return {
        "type": "sequence_classification",
        "num_labels": 2,
        "text_fields": ["text"],
        "label_field": "label",
        "train_split": "train",
        "eval_split": "validation",
        "dataset": {"files": {k: str(v) for k, v in files.items()}},
    } | overrides


def _both(path) -> dict:
    return {"train": path, "validation": path}


def test_a_quote_in_a_tsv_cell_is_text_and_rows_stay_apart(tmp_path):
    from flexbert.train.tasks import load_splits

    path = tmp_path / "q.tsv"
    path.write_text('text\tlabel\n"apple river\t1\nstone\t0\ncloud "x\t1\ngreen"\t0\n')
    (train,) = load_splits(_task(_both(path))["dataset"], ["train"]).values()
    assert train["text"] == ['"apple river', "stone", 'cloud "x', 'green"']
    assert train["label"] == [1, 0, 1, 0]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_na_nan_and_null_in_a_cell_stay_text(tmp_path, suffix):
    from flexbert.train.tasks import load_splits

    sep = "," if suffix == ".csv" else "\t"
    path = tmp_path / f"a{suffix}"
    rows = [("text", "label"), ("NA", 1), ("nan", 0), ("null", 1), ("None", 0)]
    path.write_text("".join(f"{t}{sep}{y}\n" for t, y in rows))
    (train,) = load_splits(_task(_both(path))["dataset"], ["train"]).values()
    assert train["text"] == ["NA", "nan", "null", "None"] and train["label"] == [1, 0, 1, 0]


@pytest.mark.parametrize(
    "name, content",
    [
        ("a.csv", "text,label\napple,1\n,0\n"),
        ("a.tsv", "text\tlabel\napple\t1\n\t0\n"),
        ("a.jsonl", '{"text": "apple", "label": 1}\n{"text": null, "label": 0}\n'),
    ],
)
def test_an_empty_or_null_text_is_refused_naming_split_row_and_field(
    pretrained,
    tmp_path,
    name,
    content,
):
    from flexbert.data.errors import DataError
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.tasks import build_examples

    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=r"split 'train' row 1: field 'text' is empty"):
        build_examples(_task(_both(tmp_path / name)), load_tokenizer(pretrained), 32)
    # a blank text is text (GLUE's QQP has empty questions): [CLS] [SEP]
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "apple", "label": 1}\n{"text": "", "label": 0}\n')
    examples, _ = build_examples(_task(_both(blank)), load_tokenizer(pretrained), 32)
    assert len(examples["train"][1]["input_ids"]) == 2


def test_a_null_choice_or_context_is_refused_not_read_as_none():
    from flexbert.data.errors import DataError
    from flexbert.train.tasks import encode_choices

    task = {"text_fields": ["q", "a", "b"], "num_labels": 2, "label_field": "label"}
    rows = {"q": ["x", "y"], "a": ["y", None], "b": ["z", "w"], "label": [0, 1]}
    with pytest.raises(DataError, match=r"split 'dev' row 1: field 'a' is empty"):
        encode_choices(_Rows(rows), task, None, 16, "dev", int)
    rows |= {"q": [None, "y"], "a": ["y", "v"]}
    with pytest.raises(DataError, match=r"split 'dev' row 0: field 'q' is empty"):
        encode_choices(_Rows(rows), task, None, 16, "dev", int)


@pytest.mark.parametrize(
    "kind, train, dev, match",
    [
        (
            "sequence_classification",
            "text,label\napple,1\nriver,\nstone,0\n",
            "text,label\napple,1\n",
            r"split 'train' row 1: no label in field 'label'.*0\.\.1",
        ),
        (
            "sequence_classification",
            "text,label\napple,pos\nriver,\nstone,neg\n",
            "text,label\napple,pos\n",
            r"split 'train' row 1: no label in field 'label'.*one of \['neg', 'pos'\]",
        ),
        (
            "sequence_classification",
            "text,label\napple,1\nriver,0\n",
            "text\napple\nriver\n",  # the eval file has no label column
            r"split 'validation' row 0: no label in field 'label'",
        ),
        (
            "regression",
            "text,label\napple,1.5\nriver,\nstone,3\n",
            "text,label\napple,1\n",
            r"split 'train' row 1: no label in field 'label'.*a number",
        ),
    ],
)
def test_a_missing_label_is_refused_naming_split_row_and_field(
    pretrained,
    tmp_path,
    kind,
    train,
    dev,
    match,
):
    from flexbert.data.errors import DataError
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.tasks import build_examples

    (tmp_path / "train.csv").write_text(train)
    (tmp_path / "dev.csv").write_text(dev)
    files = {"train": tmp_path / "train.csv", "validation": tmp_path / "dev.csv"}
    task = _task(files, type=kind, num_labels=1 if kind == "regression" else 2)
    with pytest.raises(DataError, match=match):
        build_examples(task, load_tokenizer(pretrained), 32)


def test_a_missing_word_label_names_its_row_and_word(pretrained):
    from flexbert.data.errors import DataError
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.tasks import encode_tokens, label_mapper

    task = {"type": "token_classification", "num_labels": 3, "label_field": "tags"}
    to_id, _ = label_mapper(task, [0, 1, None])
    rows = _Rows({"tokens": [["a"], ["b", "c"]], "tags": [[0], [1, None]]})
    tok = load_tokenizer(pretrained)
    with pytest.raises(DataError, match=r"split 'train' row 1 word 1: no label in field 'tags'"):
        encode_tokens(rows, {**task, "text_fields": ["tokens"]}, tok, 16, "train", to_id)
    rows = _Rows({"tokens": [["a"], [None, "c"]], "tags": [[0], [1, 2]]})
    with pytest.raises(DataError, match=r"row 1 word 0: null in field 'tokens'"):
        encode_tokens(rows, {**task, "text_fields": ["tokens"]}, tok, 16, "train", to_id)


def test_a_fractional_class_label_is_refused_and_whole_floats_are_ids(pretrained, tmp_path):
    from flexbert.data.errors import DataError
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.tasks import build_examples

    tok, path = load_tokenizer(pretrained), tmp_path / "a.csv"
    path.write_text("text,label\napple,1.0\nriver,0.0\n")
    examples, _ = build_examples(_task(_both(path)), tok, 32)
    assert [r["labels"] for r in examples["train"]] == [1, 0]
    path.write_text("text,label\napple,1.0\nriver,0.0\nstone,1.7\n")
    with pytest.raises(DataError, match=r"split 'train' row 2: label 1\.7 .* not a whole number"):
        build_examples(_task(_both(path)), tok, 32)


def test_fewer_label_names_than_labels_export_a_loadable_model(pretrained, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from flexbert import FlexBertForSequenceClassification
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.finetune_model import save_task_model

    model = FlexBertForSequenceClassification.from_hf(pretrained, num_labels=3)
    save_task_model(model, load_tokenizer(pretrained), tmp_path / "hf", {"labels": ["neg", "pos"]})
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert theirs.config.num_labels == 3
    assert theirs.config.id2label == {0: "neg", 1: "pos", 2: "LABEL_2"}


def test_best_eval_skips_nan_scores():
    from flexbert.train.finetune import best_eval

    history = [
        {"epoch": 1, "batch": 10, "matthews": float("nan")},
        {"epoch": 2, "batch": 20, "matthews": 0.3},
        {"epoch": 3, "batch": 30, "matthews": 0.1},
    ]
    assert best_eval(history, ["matthews"]) == {
        "metric": "matthews",
        "value": 0.3,
        "epoch": 2,
        "batch": 20,
    }
    assert best_eval(history[:1], ["matthews"]) is None


def test_entity_f1_treats_the_o_label_as_outside_wherever_it_is():
    from flexbert.train.finetune_model import build_metrics

    names = ["B-KEY", "I-KEY", "O"]
    metric = build_metrics("token_classification", 3, ["entity_f1"], names)["entity_f1"]
    # gold: B-KEY I-KEY O O B-KEY; predicted: the first entity, O for the second
    metric.update(torch.tensor([0, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 2, 0]))
    assert metric.compute().item() == pytest.approx(2 * 2 / (2 + 3))  # 2 correct of 2 and 3
