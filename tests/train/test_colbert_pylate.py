"""FlexBERT's ColBERT in PyLate's and sentence-transformers' layouts, both ways: the export
(hf/, flexbert-export) is a PyLate model that sentence-transformers' MultiVectorEncoder scores
exactly as FlexBERT does, and a PyLate or MultiVectorEncoder model loads back into
FlexBertForColBERT (encoder, projection, markers, skiplist, query expansion) scoring as they do."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from tests.train.finetune_helpers import COLBERT, compose_finetune, random_sentences


def _punctuated_texts() -> tuple[list[str], list[str]]:
    """Queries and documents with punctuation (the skiplist), some longer than the run's
    query_length (12) and document length (32) allow."""
    rng = random.Random(11)
    sentences = random_sentences(rng, 10)
    queries = [" ".join(s) + "?" for s in sentences[:4]] + [" ".join(sentences[4] * 4)]
    docs = [", ".join(s) + "." for s in sentences[5:]] + [" ! ".join(sentences[0] * 6)]
    return queries, docs


def _flexbert_scores(hf_dir: Path, queries: list[str], docs: list[str], doc_len: int):
    from flexbert import FlexBertForColBERT
    from flexbert.data.tokenizer import load_tokenizer

    model, tok = FlexBertForColBERT.from_pretrained(hf_dir).eval(), load_tokenizer(hf_dir)
    # the model adds the markers: one token less each
    q = tok(queries, padding=True, truncation=True, max_length=11, return_tensors="pt")
    d = tok(docs, padding=True, truncation=True, max_length=doc_len - 1, return_tensors="pt")
    with torch.no_grad():
        return model.score(
            (q["input_ids"], q["attention_mask"]), (d["input_ids"], d["attention_mask"])
        )


def test_the_export_is_a_pylate_colbert_that_scores_like_flexbert(colbert_run, tmp_path):
    """hf/ and a flexbert-export of the last checkpoint load in sentence-transformers'
    MultiVectorEncoder (which reads PyLate's layout) and score texts exactly as FlexBERT
    does: markers, [MASK] expansion, skiplist, document length and projection carried over."""
    from sentence_transformers import MultiVectorEncoder

    from flexbert.train.export import main as export_main

    run, summary = colbert_run
    assert summary["task"]["document_length"] == 32  # data.max_seq_len, no task.doc_max_len
    checkpoint = Path(summary["paths"]["last_checkpoint"])
    assert export_main([str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    queries, docs = _punctuated_texts()
    expected = _flexbert_scores(run / "hf", queries, docs, 32)
    for hf_dir in (run / "hf", tmp_path / "exported"):
        settings = json.loads((hf_dir / "config_sentence_transformers.json").read_text())
        assert (settings["query_length"], settings["document_length"]) == (12, 32)
        assert (settings["query_prefix"], settings["document_prefix"]) == ("[unused0]", "[unused1]")
        assert "." in settings["skiplist_words"]
        st = MultiVectorEncoder(str(hf_dir), device="cpu")
        got = st.similarity(st.encode_query(queries), st.encode_document(docs))
        torch.testing.assert_close(torch.as_tensor(got), expected, rtol=1e-4, atol=1e-4)


def test_unattended_expansion_tokens_score_as_in_sentence_transformers(colbert_run, tmp_path):
    """attend_to_expansion_tokens=False (ColBERT's and PyLate's default): the same trained
    weights, exported so, score in sentence-transformers exactly as FlexBERT scores them, and
    not as the attended queries do."""
    run, _ = colbert_run
    out = _unattended_copy(run / "hf", tmp_path / "unattended")
    settings = json.loads((out / "config_sentence_transformers.json").read_text())
    assert settings["attend_to_expansion_tokens"] is False
    queries, docs = _punctuated_texts()
    expected = _flexbert_scores(out, queries, docs, 32)
    assert not torch.allclose(expected, _flexbert_scores(run / "hf", queries, docs, 32))
    got = _sentence_transformers_scores(out, queries, docs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_pylate_export_refuses_what_pylate_could_not_read(colbert_run, tmp_path):
    from flexbert import ConfigError, FlexBertForColBERT
    from flexbert.colbert_pylate import write_pylate_modules
    from flexbert.data.tokenizer import load_tokenizer

    run, _ = colbert_run
    model, tok = FlexBertForColBERT.from_pretrained(run / "hf"), load_tokenizer(run / "hf")
    longest = model.config.max_seq_len
    with pytest.raises(ConfigError, match=f"document_length: between 3 and max_seq_len={longest}"):
        write_pylate_modules(tmp_path, model, tok, longest + 1)
    with pytest.raises(ConfigError, match="document_length: a positive integer"):
        write_pylate_modules(tmp_path, model, tok, "32")

    class WithoutTheMarker:  # a tokenizer other than the run's: the marker is no token of it
        def convert_ids_to_tokens(self, ids):
            return [
                None if i == model.query_marker_id else tok.convert_ids_to_tokens(i) for i in ids
            ]

        def convert_tokens_to_ids(self, token):
            return tok.convert_tokens_to_ids(token)

    with pytest.raises(ConfigError, match=f"token id {model.query_marker_id} .* not a token"):
        write_pylate_modules(tmp_path, model, WithoutTheMarker(), 32)
    assert not (tmp_path / "modules.json").exists()  # refused before writing


def _unattended_copy(hf_dir: Path, out: Path) -> Path:
    """The trained weights of `hf_dir`, saved with attend_to_expansion_tokens=False."""
    from flexbert import FlexBertForColBERT
    from flexbert.colbert_pylate import write_pylate_modules
    from flexbert.data.tokenizer import load_tokenizer, save_tokenizer

    attended = FlexBertForColBERT.from_pretrained(hf_dir)
    settings = {**attended.get_extra_state(), "attend_to_expansion_tokens": False}
    model = FlexBertForColBERT(attended.config, **settings)
    model.load_state_dict({**attended.state_dict(), "_extra_state": model.get_extra_state()})
    tok = load_tokenizer(hf_dir)
    model.save_hf(out)
    save_tokenizer(tok, out)
    write_pylate_modules(out, model, tok, 32)
    return out


def _pylate_only(hf_dir: Path, out: Path) -> Path:
    """A copy of a saved ColBERT without FlexBERT's own head files: a PyLate model."""
    from flexbert.colbert_settings import COLBERT_SETTINGS_FILE, COLBERT_WEIGHTS_FILE

    shutil.copytree(hf_dir, out)
    (out / COLBERT_SETTINGS_FILE).unlink()
    (out / COLBERT_WEIGHTS_FILE).unlink()
    return out


def _edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del content[key]
    path.write_text(json.dumps(content))


_DROP = object()  # _edit_json: remove the key


def _sentence_transformers_scores(folder: Path, queries: list[str], docs: list[str]):
    from sentence_transformers import MultiVectorEncoder

    st = MultiVectorEncoder(str(folder), device="cpu")
    return torch.as_tensor(st.similarity(st.encode_query(queries), st.encode_document(docs)))


@pytest.mark.parametrize("attend", [True, False])
def test_a_pylate_model_loads_with_its_projection_and_settings(colbert_run, tmp_path, attend):
    """A PyLate model (no FlexBERT head files) loads into FlexBertForColBERT with the saved
    model's settings and projection, and scores as FlexBERT's own save and as
    sentence-transformers do."""
    from flexbert import FlexBertForColBERT

    run, _ = colbert_run
    saved = run / "hf" if attend else _unattended_copy(run / "hf", tmp_path / "unattended")
    pylate = _pylate_only(saved, tmp_path / "pylate")
    original, loaded = (
        FlexBertForColBERT.from_pretrained(saved),
        FlexBertForColBERT.from_pretrained(pylate),
    )
    assert loaded.get_extra_state() == original.get_extra_state()
    assert loaded.attend_to_expansion_tokens is attend
    torch.testing.assert_close(loaded.projection.weight, original.projection.weight)
    queries, docs = _punctuated_texts()
    expected = _flexbert_scores(saved, queries, docs, 32)
    torch.testing.assert_close(_flexbert_scores(pylate, queries, docs, 32), expected)
    theirs = _sentence_transformers_scores(pylate, queries, docs)
    torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-4)


def test_pylate_defaults_fill_the_settings_an_older_save_lacks(colbert_run, tmp_path):
    """Without attend_to_expansion_tokens and skiplist_words, a PyLate 3.x save means PyLate's
    defaults (false, punctuation), as sentence-transformers reads it; the Dense weights of older
    saves (pytorch_model.bin) load too."""
    from safetensors.torch import load_file

    from flexbert import FlexBertForColBERT

    run, _ = colbert_run
    pylate = _pylate_only(run / "hf", tmp_path / "pylate")
    _edit_json(
        pylate / "config_sentence_transformers.json",
        attend_to_expansion_tokens=_DROP,
        skiplist_words=_DROP,
    )
    dense = pylate / "1_Dense"
    torch.save(load_file(str(dense / "model.safetensors")), dense / "pytorch_model.bin")
    (dense / "model.safetensors").unlink()
    original, loaded = (
        FlexBertForColBERT.from_pretrained(run / "hf"),
        FlexBertForColBERT.from_pretrained(pylate),
    )
    assert loaded.attend_to_expansion_tokens is False
    assert loaded.skiplist_ids == original.skiplist_ids  # the run's skiplist: punctuation
    torch.testing.assert_close(loaded.projection.weight, original.projection.weight)
    queries, docs = _punctuated_texts()
    theirs = _sentence_transformers_scores(pylate, queries, docs)
    ours = _flexbert_scores(pylate, queries, docs, 32)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_a_sentence_transformers_multi_vector_save_loads_and_scores_alike(
    colbert_run, tmp_path, monkeypatch
):
    """sentence-transformers' own layout (prompts for the markers, query_expansion, a
    MultiVectorMask with the skiplist, Normalize), as MultiVectorEncoder.save writes it, from
    a directory or a Hub id (a download fetches each file the head needs)."""
    from fnmatch import fnmatch

    from sentence_transformers import MultiVectorEncoder

    from flexbert import FlexBertForColBERT
    from flexbert.hf import HUB_FILES
    from tests.conftest import cache_hub_repo, offline_hub

    run, _ = colbert_run
    native = tmp_path / "native"
    MultiVectorEncoder(str(run / "hf"), device="cpu").save(str(native))
    types = [m["type"] for m in json.loads((native / "modules.json").read_text())]
    assert types[-2:] == [
        "sentence_transformers.multi_vector_encoder.modules.multi_vector_mask.MultiVectorMask",
        "sentence_transformers.base.modules.normalize.Normalize",
    ]
    assert not (native / "colbert_config.json").exists()
    original, loaded = (
        FlexBertForColBERT.from_pretrained(run / "hf"),
        FlexBertForColBERT.from_pretrained(native),
    )
    assert loaded.get_extra_state() == original.get_extra_state()
    queries, docs = _punctuated_texts()
    ours = _flexbert_scores(native, queries, docs, 32)
    torch.testing.assert_close(ours, _flexbert_scores(run / "hf", queries, docs, 32))
    theirs = _sentence_transformers_scores(native, queries, docs)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    files = [p.relative_to(native).as_posix() for p in native.rglob("*") if p.is_file()]
    missed = [f for f in files if not any(fnmatch(f, pattern) for pattern in HUB_FILES)]
    assert missed == ["README.md"]  # the model card alone stays behind
    cache_hub_repo(offline_hub(monkeypatch, tmp_path), "flexbert-tests/multi-vector", native)
    hub = FlexBertForColBERT.from_pretrained("flexbert-tests/multi-vector")
    assert hub.get_extra_state() == original.get_extra_state()


def _modules_plus_pooling(folder: Path) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Pooling", "type": "x.Pooling"})
    (folder / "modules.json").write_text(json.dumps(modules))


PYLATE_REFUSALS = {
    "dense_bias": (
        lambda d: _edit_json(d / "1_Dense/config.json", bias=True),
        "a Dense with bias=True",
    ),
    "dense_activation": (
        lambda d: _edit_json(d / "1_Dense/config.json", activation_function="torch.nn.Tanh"),
        "activation torch.nn.Tanh",
    ),
    "no_expansion": (
        lambda d: _edit_json(d / "config_sentence_transformers.json", do_query_expansion=False),
        "do_query_expansion is false",
    ),
    "text_prompt": (
        lambda d: _edit_json(d / "config_sentence_transformers.json", prompts={"query": "q: "}),
        "text prompts {'query': 'q: '}",
    ),
    "unknown_marker": (
        lambda d: _edit_json(d / "config_sentence_transformers.json", query_prefix="[NOPE]"),
        r"query_prefix '\[NOPE\]' is not one token",
    ),
    "another_module": (
        _modules_plus_pooling,
        r"modules \['Transformer', 'Dense', 'Pooling'\] have no FlexBERT counterpart",
    ),
    "no_dense_weights": (
        lambda d: (d / "1_Dense/model.safetensors").unlink(),
        "neither model.safetensors nor pytorch_model.bin",
    ),
}


@pytest.mark.parametrize("case", sorted(PYLATE_REFUSALS))
def test_what_flexbert_cannot_compute_in_a_pylate_model_is_refused(colbert_run, tmp_path, case):
    from flexbert import FlexBertForColBERT

    run, _ = colbert_run
    edit, expected = PYLATE_REFUSALS[case]
    pylate = _pylate_only(run / "hf", tmp_path / "pylate")
    edit(pylate)
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        FlexBertForColBERT.from_pretrained(pylate)


def _without_module(folder: Path, kind: str) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    kept = [m for m in modules if not m["type"].endswith(kind)]
    (folder / "modules.json").write_text(json.dumps(kept))


NATIVE_REFUSALS = {
    "no_mask_module": (
        lambda d: _without_module(d, ".MultiVectorMask"),
        "no MultiVectorMask module; without it sentence-transformers leaves",
    ),
    "text_prompt": (
        lambda d: _edit_json(
            d / "config_sentence_transformers.json", prompts={"query": "query: ", "document": ""}
        ),
        r"the query prompt 'query: ' is text \(tokenized as",
    ),
    "expansion_strategy": (
        lambda d: _edit_json(
            d / "sentence_bert_config.json",
            query_expansion={"strategy": "dynamic", "attend": True, "token": None, "length": 12},
        ),
        "query_expansion {'strategy': 'dynamic'",
    ),
    "query_skiplist": (
        lambda d: _edit_json(
            d / "2_MultiVectorMask/config.json", skiplist_tasks=["query", "document"]
        ),
        "skiplist applies to documents alone",
    ),
}


@pytest.mark.parametrize("case", sorted(NATIVE_REFUSALS))
def test_what_flexbert_cannot_compute_in_a_multi_vector_save_is_refused(
    colbert_run, tmp_path, case
):
    from sentence_transformers import MultiVectorEncoder

    from flexbert import ConfigError, FlexBertForColBERT

    run, _ = colbert_run
    native = tmp_path / "native"
    MultiVectorEncoder(str(run / "hf"), device="cpu").save(str(native))
    edit, expected = NATIVE_REFUSALS[case]
    edit(native)
    with pytest.raises(ConfigError, match=expected):
        FlexBertForColBERT.from_pretrained(native)


def test_a_skiplist_for_no_task_skips_nothing(colbert_run, tmp_path):
    """skiplist_tasks [] in a MultiVectorEncoder: every document token scores, in
    sentence-transformers and in FlexBERT alike."""
    from sentence_transformers import MultiVectorEncoder

    from flexbert import FlexBertForColBERT

    run, _ = colbert_run
    native = tmp_path / "native"
    MultiVectorEncoder(str(run / "hf"), device="cpu").save(str(native))
    _edit_json(native / "2_MultiVectorMask/config.json", skiplist_tasks=[])
    assert FlexBertForColBERT.from_pretrained(native).skiplist_ids is None
    queries, docs = _punctuated_texts()
    ours = _flexbert_scores(native, queries, docs, 32)
    assert not torch.allclose(ours, _flexbert_scores(run / "hf", queries, docs, 32))
    theirs = _sentence_transformers_scores(native, queries, docs)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_fine_tuning_continues_a_pylate_model_with_its_projection(colbert_run, tmp_path, caplog):
    """model.path=<a PyLate model>: its projection carries over; a task setting other than
    the saved one replaces it, with a warning naming it."""
    from flexbert import FlexBertForColBERT
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.finetune_colbert import load_colbert_model

    run, _ = colbert_run
    pylate = _pylate_only(run / "hf", tmp_path / "pylate")
    original = FlexBertForColBERT.from_pretrained(run / "hf")
    task = compose_finetune([f"model.path={pylate}", *COLBERT, "task.query_length=10"]).task
    with caplog.at_level("WARNING"):
        model = load_colbert_model(pylate, task, load_tokenizer(pylate))
    torch.testing.assert_close(model.projection.weight, original.projection.weight)
    assert model.query_length == 10
    assert "task.query_length: 12 -> 10" in caplog.text
