"""CoNLL-style entity F1 for token classification, and label names from ClassLabel columns."""

from __future__ import annotations

import json
import random

import pytest
import torch

from flexbert import ConfigError
from flexbert.outputs import FlexBertOutput
from flexbert.train.finetune_model import (
    ComposerFlexBertClassifier,
    SpanF1,
    check_bio_names,
    entity_spans,
)
from tests.train.finetune_helpers import FAST, KEY, compose_finetune, random_sentences, write_jsonl

NAMES = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def test_entity_spans_read_iob2_and_iob1():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-PER", "B-PER"]
    assert entity_spans(tags) == {
        ("PER", 0, 1),
        ("LOC", 3, 4),  # I- after O opens an entity (IOB1, as conlleval reads it)
        ("LOC", 5, 5),
        ("PER", 6, 6),  # I- of another type opens a new one
        ("PER", 7, 7),  # an entity at the very end closes
    }
    assert entity_spans(["O", "O"]) == set()


def test_span_f1_counts_exact_typed_spans():
    metric = SpanF1(NAMES)
    gold = [[1, 2, 0, 3], [3, 4, 0, 0]]  # PER 0-1, LOC 3 | LOC 0-1
    pred = [[1, 2, 0, 1], [3, 0, 0, 0]]  # PER 0-1 (right), PER 3 (wrong type) | LOC 0 (short)
    metric.update(pred, gold)
    # 1 correct of 3 predicted and 3 gold: F1 = 2 * 1 / (3 + 3)
    assert metric.compute().item() == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="span_f1 needs BIO label names"):
        check_bio_names(["person", "O"])
    with pytest.raises(ConfigError, match="span_f1 needs BIO label names"):
        check_bio_names(None)
    from flexbert.train.finetune_model import build_metrics

    with pytest.raises(ConfigError, match=r"num_labels=7 labels, got 5"):
        build_metrics("token_classification", 7, ["span_f1"], NAMES)


def test_entities_never_run_from_one_sentence_into_the_next():
    """Predictions are read row by row: B-PER ending row 0 and I-PER opening row 1 are two
    entities, as in the gold, not one entity across the boundary."""

    class Model(torch.nn.Module):
        config = type("C", (), {"num_labels": 5})()

    wrapper = ComposerFlexBertClassifier(Model(), "token_classification", ["span_f1"], NAMES)
    labels = torch.tensor([[-100, 0, 1, -100], [-100, 1, 2, -100]])  # gold: PER, PER..PER
    predicted = torch.tensor([[0, 0, 1, 0], [0, 2, 2, 0]])  # PER at the end | I-PER I-PER
    logits = torch.nn.functional.one_hot(predicted, 5).float()
    metric = wrapper.val_metrics["span_f1"]
    wrapper.update_metric({"labels": labels}, FlexBertOutput(logits=logits), metric)
    assert (metric.correct.item(), metric.predicted.item(), metric.gold.item()) == (2, 2, 2)


def test_class_label_columns_name_the_labels():
    import datasets

    from flexbert.train.tasks import feature_label_names, label_mapper

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=NAMES)),
            "label": datasets.ClassLabel(names=["neg", "pos"]),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"tokens": [["Ada"]], "ner_tags": [[1]], "label": [1]}, features=features
    )
    assert feature_label_names(ds, "ner_tags") == NAMES
    assert feature_label_names(ds, "label") == ["neg", "pos"]
    assert feature_label_names(ds, "tokens") is None
    task = {"type": "token_classification", "num_labels": 5}
    to_id, names = label_mapper(task, [1, 2], feature_label_names(ds, "ner_tags"))
    assert names == NAMES and to_id(2) == 2


def test_a_saved_class_label_dataset_names_its_tags(pretrained, tmp_path):
    """Through build_examples, as a run reads it: a datasets directory whose tags column is a
    sequence of ClassLabel gives the names (for span_f1 and the export's id2label)."""
    import datasets

    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.tasks import build_examples

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=NAMES)),
        }
    )
    rows = {"tokens": [["Ada", "in", "Paris"]] * 4, "ner_tags": [[1, 0, 3]] * 4}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(tmp_path / "ds")
    task = {
        "type": "token_classification",
        "num_labels": 5,
        "dataset": {"path": str(tmp_path / "ds")},
        "train_split": "train",
        "eval_split": "validation",
        "text_fields": ["tokens"],
        "label_field": "ner_tags",
    }
    examples, names = build_examples(task, load_tokenizer(pretrained), 32)
    assert names == NAMES
    assert [t for t in examples["eval"][0]["labels"] if t != -100] == [1, 0, 3]


def test_string_tags_put_the_outside_tag_first():
    from flexbert.train.tasks import label_mapper

    task = {"type": "token_classification", "num_labels": 3}
    to_id, names = label_mapper(task, ["B-KEY", "O", "I-KEY"])
    assert names == ["O", "B-KEY", "I-KEY"] and to_id("O") == 0  # what entity_f1 assumes


def test_ner_with_bio_tags_reports_span_f1(pretrained, tmp_path):
    from flexbert.train.finetune import train

    rng = random.Random(7)
    files = {}
    for split, n in (("train", 96), ("validation", 32)):
        rows = []
        for words in random_sentences(rng, n):
            tags = ["B-KEY" if w == KEY else "O" for w in words]
            rows.append({"tokens": words, "tags": tags})
        files[split] = write_jsonl(tmp_path / f"{split}.jsonl", rows)
    overrides = [f"task.dataset.files.{k}={v}" for k, v in files.items()]
    cfg = compose_finetune(
        [f"model.path={pretrained}", "task=local_token_classification", *overrides, *FAST]
        + ["task.metrics=[accuracy,span_f1]", "trainer.max_duration=1ep"]
    )
    summary = train(cfg, tmp_path / "run")
    assert set(summary["eval"]) == {"accuracy", "span_f1"}
    assert 0.0 <= summary["eval"]["span_f1"] <= 1.0
    hf = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert sorted(hf["id2label"].values()) == ["B-KEY", "O"]
