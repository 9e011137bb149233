"""flexbert-finetune task=local_colbert end to end: a tiny random encoder learns to find a
query's reversed copy by MaxSim, is evaluated on the whole eval split, saved (Composer
checkpoint and hf/), and reloads (from_pretrained, flexbert-export) with identical scores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.train.finetune_helpers import (
    COLBERT,
    FAST,
    compose_finetune,
    file_overrides,
    random_sentences,
)


def _texts(hf_dir: Path):
    from flexbert.data.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_dir)
    sentences = random_sentences(random.Random(9), 4)
    q = tok([" ".join(s) for s in sentences], padding=True, return_tensors="pt")
    d = tok([" ".join(s[::-1]) for s in sentences], padding=True, return_tensors="pt")
    return (q["input_ids"], q["attention_mask"]), (d["input_ids"], d["attention_mask"])


def test_colbert_trains_evaluates_and_writes_summary(colbert_run):
    run, summary = colbert_run
    assert summary["task"]["type"] == "colbert"
    curve = [s["loss"] for s in summary["train"]["loss_curve"]]
    assert len(curve) >= 9
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3  # the loss falls
    ev = summary["eval"]
    assert set(ev) >= {"ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_10"}
    assert 0.0 <= ev["recall_at_1"] <= ev["mrr_at_10"] <= ev["ndcg_at_10"] <= ev["recall_at_10"]
    assert ev["recall_at_10"] <= 1.0
    assert ev["mrr_at_10"] > 0.3  # far above chance (about 0.13 among 32 documents)
    assert summary["eval_best"]["metric"] == "ndcg_at_10"
    assert len(summary["eval_history"]) == 3
    written = json.loads((run / "summary.json").read_text())
    assert written["eval"] == ev
    assert summary["paths"]["hf_skipped"] is None
    # [Q] / [D] markers by default: the tokenizer's reserved [unused0] / [unused1]
    from flexbert.data.tokenizer import load_tokenizer

    saved = json.loads((run / "hf" / "colbert_config.json").read_text())
    tok = load_tokenizer(run / "hf")
    expected = tok.convert_tokens_to_ids(["[unused0]", "[unused1]"])
    assert [saved["query_marker_id"], saved["document_marker_id"]] == expected
    # and PyLate's punctuation skiplist: "," "." ... where the vocabulary has them
    punctuation = sorted(tok.get_vocab()[c] for c in ",.;:!?" if c in tok.get_vocab())
    assert len(punctuation) >= 3 and set(punctuation) <= set(saved["skiplist_ids"])


def test_eval_metric_equals_ranking_by_the_saved_model(colbert_run, colbert_pairs):
    """Recompute recall@1 over the eval split with the saved model's MaxSim scores."""
    from flexbert import FlexBertForColBERT
    from flexbert.data.tokenizer import load_tokenizer

    run, summary = colbert_run
    model = FlexBertForColBERT.from_pretrained(run / "hf").eval()
    assert (model.colbert_dim, model.query_length) == (32, 12)
    rows = [json.loads(line) for line in Path(colbert_pairs["validation"]).read_text().splitlines()]
    tok = load_tokenizer(run / "hf")
    q = tok(
        [r["query"] for r in rows], padding=True, truncation=True, max_length=11
    )  # [Q] is the 12th
    d = tok([r["positive"] for r in rows], padding=True, truncation=True, max_length=31)  # [D]
    with torch.no_grad():
        scores = model.score(
            (torch.tensor(q["input_ids"]), torch.tensor(q["attention_mask"])),
            (torch.tensor(d["input_ids"]), torch.tensor(d["attention_mask"])),
        )
    own = scores.diagonal()
    ranks = (scores > own[:, None]).sum(-1) + 1
    assert abs(float((ranks <= 1).float().mean()) - summary["eval"]["recall_at_1"]) < 1e-6
    assert abs(float((ranks <= 10).float().mean()) - summary["eval"]["recall_at_10"]) < 1e-6


def test_saved_model_reloads_with_identical_scores(colbert_run, tmp_path):
    """hf/ (from_pretrained), the final Composer checkpoint (flexbert-export) and the
    checkpoint loaded directly all score like the trained model."""
    from flexbert import FlexBertForColBERT
    from flexbert.train.checkpoints import load_checkpoint_model, read_model_config
    from flexbert.train.export import main as export_main

    run, summary = colbert_run
    queries, docs = _texts(run / "hf")
    hf_model = FlexBertForColBERT.from_pretrained(run / "hf").eval()
    checkpoint = Path(summary["paths"]["last_checkpoint"])
    direct = load_checkpoint_model(
        checkpoint, read_model_config(run / "model_config.json"), FlexBertForColBERT
    )
    assert export_main([str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    exported = FlexBertForColBERT.from_pretrained(tmp_path / "exported").eval()
    assert (tmp_path / "exported" / "tokenizer.json").exists()
    with torch.no_grad():
        expected = hf_model.score(queries, docs)
        torch.testing.assert_close(direct.score(queries, docs), expected)
        torch.testing.assert_close(exported.score(queries, docs), expected)
    # trained, not the random start: the positives now win
    assert bool((expected.argmax(-1) == torch.arange(4)).float().mean() >= 0.5)


def test_transformers_loads_the_encoder_of_the_export(colbert_run):
    from transformers import AutoModel

    run, _ = colbert_run
    encoder = AutoModel.from_pretrained(run / "hf")
    assert type(encoder).__name__ == "ModernBertModel"


def test_a_colbert_run_folder_continues_with_its_projection(colbert_run, caplog):
    """Its newest checkpoint (the final model) scores exactly as its hf/ export: encoder and
    projection both carried over. Settings without weights (markers, skiplist, query length)
    follow the task, with a warning naming each change; another colbert_dim is refused."""
    from flexbert import ConfigError, FlexBertForColBERT
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.finetune_colbert import load_colbert_model

    run, _ = colbert_run
    tok = load_tokenizer(run / "hf")
    task = {"colbert_dim": 32, "query_length": 12}
    task |= {"query_marker": "[unused0]", "document_marker": "[unused1]", "skiplist": "punctuation"}
    continued = load_colbert_model(run, task, tok).eval()
    exported = FlexBertForColBERT.from_pretrained(run / "hf").eval()
    queries, docs = _texts(run / "hf")
    with torch.no_grad():
        torch.testing.assert_close(continued.score(queries, docs), exported.score(queries, docs))
    with pytest.raises(
        ConfigError, match=r"task.colbert_dim=64, but .* projection of 32: set.*fresh_projection"
    ):
        load_colbert_model(run, {**task, "colbert_dim": 64}, tok)
    other = {**task, "query_marker": None, "skiplist": [","]}
    for source in (run, run / "hf"):
        caplog.clear()
        changed = load_colbert_model(source, other, tok)
        assert changed.query_marker_id is None and changed.skiplist_ids == [tok.get_vocab()[","]]
        assert changed.document_marker_id == exported.document_marker_id
        torch.testing.assert_close(changed.projection.weight, exported.projection.weight)
        assert "task.query_marker: " in caplog.text and "task.skiplist: " in caplog.text
    caplog.clear()
    unattended = load_colbert_model(run, {**task, "attend_to_expansion_tokens": False}, tok)
    assert unattended.attend_to_expansion_tokens is False
    assert "task.attend_to_expansion_tokens: True -> False" in caplog.text


def test_a_fresh_projection_keeps_only_the_encoder_of_a_colbert(colbert_run):
    """task.fresh_projection: another colbert_dim on a ColBERT's encoder, from its run folder
    or its hf/ export (without it, that colbert_dim is refused above)."""
    from flexbert import FlexBertForColBERT
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.finetune_colbert import load_colbert_model

    run, _ = colbert_run
    tok = load_tokenizer(run / "hf")
    task = {"colbert_dim": 16, "query_length": 12, "fresh_projection": True}
    task |= {"query_marker": "[unused0]", "document_marker": "[unused1]", "skiplist": None}
    exported = FlexBertForColBERT.from_pretrained(run / "hf")
    for source in (run, run / "hf"):
        fresh = load_colbert_model(source, task, tok)
        assert fresh.projection.weight.shape == (16, exported.config.hidden_size)
        encoder, trained = fresh.model.state_dict(), exported.model.state_dict()
        assert encoder.keys() == trained.keys()
        for name, weight in trained.items():
            torch.testing.assert_close(encoder[name], weight, msg=name)


def test_a_colbert_run_can_start_from_a_colbert_run_folder(colbert_run, colbert_pairs, tmp_path):
    from flexbert.train.finetune import train

    run, _ = colbert_run
    cfg = compose_finetune(
        [f"model.path={run}", *COLBERT, *file_overrides(colbert_pairs), *FAST]
        + ["trainer.max_duration=1ep", "export_hf=false"]
    )
    summary = train(cfg, tmp_path / "again")
    assert summary["pretrained"]["checkpoint"] is not None
    assert summary["train"]["batches"] > 0


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("task.query_length=0", "query_length: a positive integer"),
        ("task.doc_max_len=-3", "task.doc_max_len: a positive integer"),
        ("task.metrics=[accuracy]", r"do not apply to colbert; choose from"),
        ("task.text_fields=[query]", r"retrieval needs \[query, positive\]"),
        ("task.query_marker='[Q]'", r"task.query_marker: '\[Q\]' is not a token of the tokenizer"),
        ("task.query_marker=[Q]", r"task.query_marker: a token \(a string\) or null, got \['Q'\]"),
        ("task.skiplist=[zzzq]", r"task.skiplist: \['zzzq'\] are not tokens of the tokenizer"),
        ("task.skiplist=all", r"task.skiplist: 'punctuation', a list of tokens or null"),
        (
            "task.document_marker='[unused0]'",
            r"task.query_marker and task.document_marker are the same",
        ),
    ],
)
def test_bad_colbert_settings_are_clear_errors(pretrained, colbert_pairs, tmp_path, bad, expected):
    from flexbert import ConfigError
    from flexbert.data.errors import DataError
    from flexbert.train.finetune import train

    cfg = compose_finetune(
        [f"model.path={pretrained}", *COLBERT, *file_overrides(colbert_pairs), *FAST, bad]
    )
    with pytest.raises((ConfigError, DataError), match=expected):
        train(cfg, tmp_path / "run")


@pytest.mark.slow
def test_gathered_documents_on_two_ranks_equal_one_process_with_the_whole_batch(two_ranks):
    """Two processes (gloo), 3 pairs each and documents of different widths per rank: the
    DDP-averaged gradients and mean loss equal one process scoring 6 queries against all 6
    positives (padding to the widest document on any rank changes no score)."""
    from tests.train.conftest import assert_every_rank_took_this_step
    from tests.train.two_rank_worker import colbert_batch, colbert_model

    model, (queries, docs, mask) = colbert_model(), colbert_batch()
    out = model(queries, candidates=(docs, mask))
    out.loss.backward()
    assert_every_rank_took_this_step(two_ranks("colbert"), out.loss, model)
    local = model(queries[:3], candidates=(docs[:3], mask[:3])).loss.detach()
    assert not torch.allclose(local, out.loss.detach())  # 3 candidates would differ


def test_corpus_metric_chunks_score_like_one_block():
    """The eval metric's chunked MaxSim over unpadded storage equals one padded block."""
    from flexbert.colbert import maxsim
    from flexbert.train import finetune_colbert as fc
    from flexbert.train.finetune_retrieval import positive_ranks

    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(10, 4, 8, generator=g), dim=-1)
    docs = torch.nn.functional.normalize(torch.randn(10, 7, 8, generator=g), dim=-1)
    mask = torch.arange(7)[None, :] < torch.randint(1, 8, (10,), generator=g)[:, None]
    docs = docs * mask[..., None]
    metric = fc.CorpusMaxSimMetric("recall_at_1")
    for start in (0, 4):  # two eval batches of different widths
        stop = start + (4 if start == 0 else 6)
        width = int(mask[start:stop].sum(-1).max())
        metric.update(queries[start:stop], docs[start:stop, :width], mask[start:stop, :width])
    expected = positive_ranks(queries, None, 3, lambda q, _: maxsim(q, docs, mask)) <= 1
    old = fc.SCORE_BUDGET
    try:
        fc.SCORE_BUDGET = fc.QUERY_CHUNK * 4 * 7 * 2  # two documents a chunk
        torch.testing.assert_close(metric.compute(), expected.float().mean())
    finally:
        fc.SCORE_BUDGET = old


def test_every_file_of_a_saved_colbert_comes_from_the_hub(colbert_run, monkeypatch, tmp_path):
    """A Hub download fetches only HUB_FILES: each file save_hf writes must match one (the
    settings once did not, and the projection silently restarted), and a Hub id loads."""
    from fnmatch import fnmatch

    from flexbert import FlexBertForColBERT
    from flexbert.hf import HUB_FILES
    from tests.conftest import cache_hub_repo, offline_hub

    run, _ = colbert_run
    saved = [p.relative_to(run / "hf").as_posix() for p in (run / "hf").rglob("*") if p.is_file()]
    assert "colbert_config.json" in saved
    assert [f for f in saved if not any(fnmatch(f, pattern) for pattern in HUB_FILES)] == []
    cache_hub_repo(offline_hub(monkeypatch, tmp_path), "flexbert-tests/colbert", run / "hf")
    queries, docs = _texts(run / "hf")
    with torch.no_grad():
        local = FlexBertForColBERT.from_pretrained(run / "hf").eval().score(queries, docs)
        hub = FlexBertForColBERT.from_pretrained("flexbert-tests/colbert").eval()
        torch.testing.assert_close(hub.score(queries, docs), local)


def test_half_a_saved_colbert_head_is_refused(colbert_run, tmp_path):
    import shutil

    from flexbert import FlexBertForColBERT

    run, _ = colbert_run
    shutil.copytree(run / "hf", tmp_path / "hf")
    (tmp_path / "hf" / "colbert_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="not colbert_config.json"):
        FlexBertForColBERT.from_hf(tmp_path / "hf")


def test_a_colbert_run_seeds_other_tasks_with_its_encoder(colbert_run):
    """Its encoder carries over into a sentence-embedding, classification or MLM model (their
    own heads start fresh; the projection and its settings are dropped)."""
    from flexbert import FlexBertForColBERT, FlexBertForSequenceClassification
    from flexbert.train.checkpoints import (
        last_checkpoint,
        load_checkpoint_model,
        load_pretrained,
        load_pretrained_mlm,
        read_model_config,
    )
    from flexbert.train.finetune_retrieval import load_embedding_model

    run, _ = colbert_run
    source = load_checkpoint_model(
        last_checkpoint(run), read_model_config(run / "model_config.json"), FlexBertForColBERT
    )
    encoder = source.model.state_dict()
    for model in (
        load_embedding_model(run),
        load_pretrained(run, FlexBertForSequenceClassification, num_labels=3),
        load_pretrained_mlm(run),
    ):
        assert all(torch.equal(v, encoder[k]) for k, v in model.model.state_dict().items())


def test_markers_take_one_token_of_each_length_and_eval_documents_get_theirs(pretrained):
    """With markers a query is cut to query_length - 1 tokens and a document to its length
    - 1 (the model adds [Q] / [D]); evaluation encodes documents with their marker too."""
    from datasets import Dataset

    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.finetune_colbert import (
        ComposerFlexBertColBERT,
        encode_colbert_pairs,
        load_colbert_model,
    )

    tok = load_tokenizer(pretrained)
    words = " ".join(
        random_sentences(random.Random(2), 8)[i][j] for i in range(8) for j in range(3)
    )
    ds = Dataset.from_dict({"query": [words], "positive": [words]})
    task = {"text_fields": ["query", "positive"], "query_length": 12, "colbert_dim": 16}
    marked = {**task, "query_marker": "[unused0]", "document_marker": "[unused1]"}
    plain_row = encode_colbert_pairs(ds, task, tok, 20, "train")[0]
    row = encode_colbert_pairs(ds, marked, tok, 20, "train")[0]
    assert (len(plain_row["input_ids"]), len(plain_row["cand_ids"])) == (12, 20)
    assert (len(row["input_ids"]), len(row["cand_ids"])) == (11, 19)
    model = load_colbert_model(pretrained, marked, tok).eval()
    ids = torch.tensor([row["cand_ids"]])
    batch = {"input_ids": torch.tensor([row["input_ids"]]), "attention_mask": torch.ones(1, 11)}
    batch |= {"cand_ids": ids, "cand_mask": torch.ones_like(ids)}
    with torch.no_grad():
        out = ComposerFlexBertColBERT(model).eval_forward(batch)
        docs, mask = model.encode_documents(ids, torch.ones_like(ids))
        unmarked, _ = model.token_vectors(ids, torch.ones_like(ids))
    assert out.candidate_embeddings.shape[1] == 20  # 19 tokens and [D]
    torch.testing.assert_close(out.candidate_embeddings, docs)
    assert not torch.allclose(docs[:, :19], unmarked, atol=1e-4)


def test_an_older_colbert_without_markers_takes_the_tasks_markers(pretrained, tmp_path):
    from flexbert import FlexBertForColBERT
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.finetune_colbert import load_colbert_model

    old = FlexBertForColBERT.from_hf(pretrained, colbert_dim=16, query_length=12)
    old.save_hf(tmp_path / "old")
    tok = load_tokenizer(pretrained)
    task = {"colbert_dim": 16, "query_length": 12, "query_marker": "[unused0]"}
    continued = load_colbert_model(tmp_path / "old", task, tok)
    assert continued.query_marker_id == tok.convert_tokens_to_ids("[unused0]")
    torch.testing.assert_close(continued.projection.weight, old.projection.weight)
