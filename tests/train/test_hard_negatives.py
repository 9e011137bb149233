"""Hard negatives for retrieval and ColBERT fine-tuning (`task.negative_fields`): read from
text or list fields, collated after the positives, scored by the loss, counted as tokens and
gathered across ranks like the positives."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from flexbert.data.errors import DataError
from flexbert.registry import ConfigError
from flexbert.train.finetune_retrieval import ComposerFlexBertRetrieval
from flexbert.train.retrieval_data import PairCollator, candidate_inputs, encode_pairs
from tests.train.finetune_helpers import (
    FAST,
    compose_finetune,
    file_overrides,
    random_sentences,
    write_jsonl,
)

TASK = {"text_fields": ["query", "positive"], "negative_fields": ["negative", "more"]}


@pytest.fixture(scope="module")
def tokenizer(pretrained):
    from flexbert.data.tokenizer import load_tokenizer

    return load_tokenizer(pretrained)


def _split(**columns) -> Dataset:
    base = {"query": ["apple river", "bank"], "positive": ["river apple", "bank bank"]}
    return Dataset.from_dict(base | columns)


def test_negatives_come_from_text_and_list_fields_in_order(tokenizer):
    ds = _split(negative=["shore", "tree"], more=[["stone", "hill"], ["sky", "sea"]])
    rows = encode_pairs(ds, TASK, tokenizer, 16, "train")
    expected = [["shore", "stone", "hill"], ["tree", "sky", "sea"]]
    for row, texts in zip(rows, expected):
        assert row["neg_ids"] == tokenizer(texts)["input_ids"]
    first = encode_pairs(ds, {**TASK, "num_negatives": 1}, tokenizer, 16, "train")
    assert [r["neg_ids"] for r in first] == [[rows[0]["neg_ids"][0]], [rows[1]["neg_ids"][0]]]
    # evaluation ranks against the positives only
    assert all(
        "neg_ids" not in r for r in encode_pairs(ds, TASK, tokenizer, 16, "dev", None, False)
    )


def test_one_negative_field_may_be_named_alone_and_empty_texts_are_refused(tokenizer):
    ds = _split(negative=["shore", "tree"])
    alone = encode_pairs(ds, {**TASK, "negative_fields": "negative"}, tokenizer, 16, "train")
    assert [len(r["neg_ids"]) for r in alone] == [1, 1]
    empty = Dataset.from_dict({"query": ["apple", None], "positive": ["river", "bank"]})
    with pytest.raises(DataError, match=r"split 'dev' row 1: field 'query' is empty"):
        encode_pairs(empty, TASK, tokenizer, 16, "dev", None, False)
    blank = Dataset.from_dict({"query": ["apple", "bank"], "positive": ["river", " "]})
    with pytest.raises(DataError, match=r"row 1: field 'positive' is empty"):
        encode_pairs(blank, TASK, tokenizer, 16, "train")


def test_uneven_empty_or_missing_negatives_are_refused_with_the_fix(tokenizer):
    uneven = _split(negative=["shore", "tree"], more=[["stone"], ["sky", "sea"]])
    with pytest.raises(DataError, match=r"row 1 has 3 hard negative.*not 2.*num_negatives"):
        encode_pairs(uneven, TASK, tokenizer, 16, "train")
    assert (
        len(encode_pairs(uneven, {**TASK, "num_negatives": 2}, tokenizer, 16, "t")[1]["neg_ids"])
        == 2
    )
    with pytest.raises(DataError, match=r"row 0 has 2 .*num_negatives=3.*N <= 2"):
        encode_pairs(uneven, {**TASK, "num_negatives": 3}, tokenizer, 16, "train")
    empty = _split(negative=["shore", " "], more=[["a"], ["b"]])
    with pytest.raises(DataError, match=r"row 1: field 'negative' has an empty negative"):
        encode_pairs(empty, TASK, tokenizer, 16, "train")
    with pytest.raises(DataError, match=r"no field\(s\) \['more'\]"):
        encode_pairs(_split(negative=["a", "b"]), TASK, tokenizer, 16, "train")
    with pytest.raises(ConfigError, match="task.num_negatives: a positive integer"):
        encode_pairs(uneven, {**TASK, "num_negatives": 0}, tokenizer, 16, "train")


def test_lists_written_as_csv_text_or_rows_without_negatives_are_refused(tokenizer):
    """CSV has no list type: a list column arrives as its text and would train on it."""
    as_text = _split(negative=["['shore', 'tree']", "['stone', 'sky']"])
    task = {**TASK, "negative_fields": ["negative"]}
    with pytest.raises(DataError, match=r"row 0: field 'negative' holds .* as text.*JSONL"):
        encode_pairs(as_text, task, tokenizer, 16, "train")
    assert encode_pairs(_split(negative=["[a] b", "c"]), task, tokenizer, 16, "t")[0]["neg_ids"]
    scores_as_text = _split(negative=["a", "b"], scores=["[1.0, 0.5]", "[2, 1]"])
    distil = {**task, "teacher_scores_field": "scores"}
    with pytest.raises(DataError, match=r"row 0: field 'scores' holds its scores written as text"):
        encode_pairs(scores_as_text, distil, tokenizer, 16, "train")
    none = {**TASK, "negative_fields": ["more"]}
    with pytest.raises(DataError, match=r"row 0 has no hard negative in \['more'\]"):
        encode_pairs(_split(more=[[], []]), none, tokenizer, 16, "train")
    with pytest.raises(
        DataError, match=r"no field\(s\) \['scores'\] \(task.teacher_scores_field\)"
    ):
        encode_pairs(_split(negative=["a", "b"]), distil, tokenizer, 16, "train")


def test_only_the_training_split_gets_negatives_and_teacher_scores(tokenizer, tmp_path):
    from flexbert.train.tasks import build_examples

    rows = [
        {"query": "apple", "positive": "river", "negatives": ["bank", "shore"], "scores": [3, 1, 0]}
    ] * 4
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", rows) for s in ("train", "validation")}
    task = {
        "type": "retrieval",
        "dataset": {"files": {k: str(v) for k, v in files.items()}},
        "train_split": "train",
        "eval_split": "validation",
        "text_fields": ["query", "positive"],
        "negative_fields": ["negatives"],
        "teacher_scores_field": "scores",
    }
    for kind in ("retrieval", "colbert"):
        examples, _ = build_examples({**task, "type": kind}, tokenizer, 16)
        assert all(
            len(r["neg_ids"]) == 2 and len(r["teacher_scores"]) == 3 for r in examples["train"]
        )
        assert all("neg_ids" not in r and "teacher_scores" not in r for r in examples["eval"])


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    rng = random.Random(3)
    sentences = [" ".join(s) for s in random_sentences(rng, 12)]
    ds = Dataset.from_dict(
        {
            "query": sentences[:4],
            "positive": [s[::-1] for s in sentences[:4]],
            "negative": sentences[4:8],
            "more": [[a] for a in sentences[8:]],
        }
    )
    return PairCollator(tokenizer.pad_token_id)(encode_pairs(ds, TASK, tokenizer, 24, "train"))


def test_retrieval_loss_scores_positives_then_hard_negatives(tokenizer, pretrained):
    from flexbert.train.data_spec import token_counts
    from flexbert.train.finetune_retrieval import load_embedding_model

    batch = _batch(tokenizer)
    assert batch["neg_ids"].shape[:2] == (4, 2)
    assert batch["neg_ids"].shape[2] == batch["cand_ids"].shape[1]  # one width for candidates
    wrapper = ComposerFlexBertRetrieval(load_embedding_model(pretrained)).train()
    loss = wrapper(batch).loss
    model = wrapper.model
    queries = model.embed(batch["input_ids"], batch["attention_mask"])
    docs = model.embed(*candidate_inputs(batch))  # 4 positives, then 8 negatives
    assert docs.shape[0] == 12
    expected = F.cross_entropy(queries @ docs.T / model.temperature, torch.arange(4))
    torch.testing.assert_close(loss, expected)
    without = {k: v for k, v in batch.items() if not k.startswith("neg_")}
    assert not torch.allclose(wrapper(without).loss, loss)  # the negatives changed the loss
    counts = token_counts(batch)
    assert counts["total"] == sum(
        int(batch[k].sum()) for k in ("attention_mask", "cand_mask", "neg_mask")
    )
    assert counts["total"] > token_counts(without)["total"]


def test_colbert_loss_scores_positives_then_hard_negatives(tokenizer, pretrained):
    from flexbert.colbert import maxsim
    from flexbert.train.finetune_colbert import ComposerFlexBertColBERT, load_colbert_model

    batch = _batch(tokenizer)
    model = load_colbert_model(pretrained, {"colbert_dim": 16, "query_length": 12})
    wrapper = ComposerFlexBertColBERT(model).train()
    loss = wrapper(batch).loss
    queries = model.encode_queries(batch["input_ids"], batch["attention_mask"])
    docs, mask = model.encode_documents(*candidate_inputs(batch))
    expected = F.cross_entropy(maxsim(queries, docs, mask), torch.arange(4))
    torch.testing.assert_close(loss, expected)
    without = {k: v for k, v in batch.items() if not k.startswith("neg_")}
    assert not torch.allclose(wrapper(without).loss, loss)


@pytest.mark.slow
def test_hard_negatives_on_two_ranks_equal_one_process_with_the_whole_batch(two_ranks):
    """Each rank scores its 3 queries against both ranks' 3 positives and 6 negatives: the
    DDP-averaged step equals one process with all 6 pairs and 12 negatives."""
    from tests.train.conftest import assert_every_rank_took_this_step
    from tests.train.two_rank_worker import embedding_model, hard_negative_batch

    wrapper = ComposerFlexBertRetrieval(embedding_model()).train()
    loss = wrapper(hard_negative_batch()).loss
    loss.backward()
    assert_every_rank_took_this_step(two_ranks("hard_negatives"), loss, wrapper.model)


@pytest.mark.parametrize(
    "task",
    [["task=local_retrieval"], ["task=local_colbert", "task.teacher_scores_field=scores"]],
    ids=["retrieval", "colbert distillation"],
)
def test_fine_tuning_with_a_list_of_hard_negatives_per_query(pretrained, tmp_path, task):
    """End to end from JSONL with a `negatives` list column (and a teacher's `scores`): the
    run's token count includes every query, positive and hard negative it encoded (one
    epoch)."""
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.finetune import train

    rng = random.Random(6)
    files, train_rows = {}, []
    for split, n in (("train", 32), ("validation", 16)):
        rows = []
        for s in random_sentences(rng, n):
            others = [" ".join(rng.sample(s, len(s))) for _ in range(3)]
            scores = [rng.uniform(-2, 5) for _ in range(4)]
            rows.append(
                {"query": " ".join(s), "positive": " ".join(s[::-1])}
                | {"negatives": others, "scores": scores}
            )
        files[split] = write_jsonl(tmp_path / f"{split}.jsonl", rows)
        train_rows = train_rows or rows
    cfg = compose_finetune(
        [
            f"model.path={pretrained}",
            *task,
            *file_overrides(files),
            *FAST,
            "trainer.max_duration=1ep",
        ]
        + ["task.negative_fields=[negatives]", "task.num_negatives=2"]
    )
    summary = train(cfg, tmp_path / "run")
    tok = load_tokenizer(pretrained)
    texts = [t for r in train_rows for t in (r["query"], r["positive"], *r["negatives"][:2])]
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=32)["input_ids"]]
    assert summary["train"]["tokens"] == sum(lengths)


# ------------------------------------------------------------------ knowledge distillation
DISTIL = {**TASK, "teacher_scores_field": "scores"}


def test_teacher_scores_are_read_per_row_and_cut_like_the_negatives(tokenizer):
    ds = _split(
        negative=["shore", "tree"], more=[["stone"], ["sky"]], scores=[[3, 1.5, -2], [0.5, 4, 1]]
    )
    rows = encode_pairs(ds, DISTIL, tokenizer, 16, "train")
    assert [r["teacher_scores"] for r in rows] == [[3.0, 1.5, -2.0], [0.5, 4.0, 1.0]]
    cut = encode_pairs(ds, {**DISTIL, "num_negatives": 1}, tokenizer, 16, "train")
    assert [r["teacher_scores"] for r in cut] == [[3.0, 1.5], [0.5, 4.0]]
    batch = PairCollator(tokenizer.pad_token_id)(cut)
    assert batch["teacher_scores"].shape == (2, 2) and batch["neg_ids"].shape[:2] == (2, 1)
    assert "teacher_scores" not in encode_pairs(ds, DISTIL, tokenizer, 16, "dev", None, False)[0]


@pytest.mark.parametrize(
    "scores",
    [[[3, 1.5], [0.5, 4, 1]], [None, [0.5, 4, 1]], [[3, 1, float("nan")], [1, 2, 3]]],
    ids=["too few", "missing", "nan"],
)
def test_teacher_scores_of_the_wrong_length_or_type_name_the_row(tokenizer, scores):
    ds = _split(negative=["shore", "tree"], more=[["stone"], ["sky"]], scores=scores)
    with pytest.raises(DataError, match=r"row 0: field 'scores' holds .* needs 3 finite numbers"):
        encode_pairs(ds, DISTIL, tokenizer, 16, "train")


def test_teacher_scores_without_hard_negatives_are_refused(tokenizer):
    ds = _split(scores=[[1.0], [2.0]])
    with pytest.raises(ConfigError, match="teacher_scores_field needs task.negative_fields"):
        encode_pairs(
            ds,
            {**TASK, "negative_fields": [], "teacher_scores_field": "scores"},
            tokenizer,
            16,
            "t",
        )


def test_distillation_loss_is_kl_between_the_softmaxes():
    from flexbert.train.finetune_retrieval import distillation_loss

    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    assert distillation_loss(teacher + 5, teacher).item() == pytest.approx(0, abs=1e-6)
    student = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 2.0]])
    p, q = teacher.softmax(-1), student.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher), expected)
    # normalised: each row of student scores min-max scaled to [0, 1] first (PyLate)
    scaled = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(
        distillation_loss(student * 7 - 3, teacher, normalize=True),
        distillation_loss(scaled, teacher),
    )


def _distil_batch(tokenizer) -> dict[str, torch.Tensor]:
    batch = _batch(tokenizer)
    batch["teacher_scores"] = torch.tensor(
        [[4.0, 1.0, 0.0], [3.0, 2.0, -1.0], [1.0, 0.0, 5.0], [2.0, 2.0, 2.0]]
    )
    return batch


def _own_docs(batch: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query i's positive, then its hard negatives, as (ids, mask)."""
    ids = torch.cat([batch["cand_ids"][i : i + 1], batch["neg_ids"][i]])
    return ids, torch.cat([batch["cand_mask"][i : i + 1], batch["neg_mask"][i]])


def test_retrieval_distils_each_querys_own_candidates(tokenizer, pretrained):
    from flexbert.train.finetune_retrieval import distillation_loss, load_embedding_model

    batch = _distil_batch(tokenizer)
    wrapper = ComposerFlexBertRetrieval(load_embedding_model(pretrained)).train()
    loss = wrapper(batch).loss
    model = wrapper.model
    student = (
        torch.stack(
            [
                model.embed(*_own_docs(batch, i))
                @ model.embed(batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1])[0]
                for i in range(4)
            ]
        )
        / model.temperature
    )
    torch.testing.assert_close(loss, distillation_loss(student, batch["teacher_scores"]))
    loss.backward()  # the loss trains the encoder
    assert model.model.layers[0].mlp.Wi.weight.grad.abs().sum() > 0


def test_colbert_distils_min_max_scaled_maxsim_of_own_candidates(tokenizer, pretrained):
    from flexbert.colbert import maxsim
    from flexbert.train.finetune_colbert import ComposerFlexBertColBERT, load_colbert_model
    from flexbert.train.finetune_retrieval import distillation_loss

    batch = _distil_batch(tokenizer)
    model = load_colbert_model(pretrained, {"colbert_dim": 16, "query_length": 12})
    loss = ComposerFlexBertColBERT(model).train()(batch).loss
    queries = model.encode_queries(batch["input_ids"], batch["attention_mask"])
    student = torch.stack(
        [
            maxsim(queries[i : i + 1], *model.encode_documents(*_own_docs(batch, i)))[0]
            for i in range(4)
        ]
    )
    expected = distillation_loss(student, batch["teacher_scores"], normalize=True)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, distillation_loss(student, batch["teacher_scores"]))
