"""sentence-transformers directories: a FlexBertForSentenceEmbedding saved by FlexBERT loads in
`SentenceTransformer` with the same vectors, and sentence-transformers' own directories load
into FlexBERT as sentence-transformers reads them (pooling, modules), or are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from flexbert import ConfigError, FlexBertForSentenceEmbedding, FlexBertModel, ModelConfig


def _word_tokenizer(out):
    """A whitespace word-level tokenizer with FlexBERT's tiny special ids, saved into `out`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i + 5 for i in range(200)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{f"{k}_token": f"[{k.upper()}]" for k in ("pad", "cls", "sep", "mask", "unk")},
    )
    fast.save_pretrained(out)
    return fast


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sentence_embeddings_load_in_sentence_transformers_with_the_same_vectors(tmp_path, pooling):
    st = pytest.importorskip("sentence_transformers")
    model = FlexBertForSentenceEmbedding(ModelConfig.preset("tiny", pooling=pooling)).eval()
    model.save_hf(tmp_path)
    tok = _word_tokenizer(tmp_path)
    texts = ["w1 w7 w3 w9 w11 w4", "w5 w6", "w100 w20 w30"]
    loaded = st.SentenceTransformer(str(tmp_path), device="cpu")
    got = loaded.encode(texts, convert_to_tensor=True)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.embed(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    other = FlexBertForSentenceEmbedding.from_hf(tmp_path)  # and back, pooling included
    assert other.config.pooling.name == pooling
    with torch.no_grad():
        torch.testing.assert_close(other.embed(enc["input_ids"], enc["attention_mask"]), expected)


def test_a_sentence_transformers_directory_loads_with_its_own_pooling(tmp_path):
    """A directory saved by sentence-transformers itself (its newer module format) whose
    config.json still says cls pooling, as third-party embedding models do: the Pooling
    module decides, and the vectors match sentence-transformers'."""
    st = pytest.importorskip("sentence_transformers")
    model = FlexBertForSentenceEmbedding(ModelConfig.preset("tiny", pooling="mean")).eval()
    model.save_hf(tmp_path / "ours")
    tok = _word_tokenizer(tmp_path / "ours")
    st.SentenceTransformer(str(tmp_path / "ours"), device="cpu").save(str(tmp_path / "st"))
    cfg_file = tmp_path / "st" / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"mean"', '"cls"'))
    loaded = FlexBertForSentenceEmbedding.from_hf(tmp_path / "st").eval()
    assert loaded.config.pooling.name == "mean"
    texts = ["w3 w4 w5 w6 w7", "w8"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = loaded.embed(enc["input_ids"], enc["attention_mask"])
    expected = st.SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    pooling = tmp_path / "st" / "1_Pooling" / "config.json"
    pooling.write_text(pooling.read_text().replace('"mean"', '"max"'))
    with pytest.raises(ConfigError, match="no FlexBERT counterpart"):
        FlexBertForSentenceEmbedding.from_hf(tmp_path / "st")


@pytest.mark.parametrize(
    ("settings", "pooling"),
    [
        ({"pooling_mode": "cls"}, "cls"),
        ({"pooling_mode": ["mean"]}, "mean"),  # sentence-transformers 6 may save a list
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"pooling_mode_cls_token": False}, "mean"),  # no flag set: it pools by mean
        ({"pooling_mode": ["mean", "max"]}, None),
        ({"pooling_mode": "max"}, None),
    ],
)
def test_every_form_of_a_pooling_config_reads_as_sentence_transformers_reads_it(
    tmp_path, settings, pooling
):

    from flexbert.hf_sentence_transformers import sentence_transformers_layout

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(settings))
    if pooling is None:
        with pytest.raises(ConfigError, match="no FlexBERT counterpart"):
            sentence_transformers_layout(tmp_path)
    else:
        assert sentence_transformers_layout(tmp_path) == (tmp_path, pooling)


def test_sentence_embedding_loading_names_what_sentence_transformers_would_do_otherwise(
    tmp_path, caplog
):
    """No Normalize module: a warning (its vectors are not unit length, FlexBERT's are). A
    Dense module, even without a Pooling one (a PyLate ColBERT): refused."""

    FlexBertForSentenceEmbedding(ModelConfig.preset("tiny")).save_hf(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    kept = [m for m in modules if not m["type"].endswith("Normalize")]
    (tmp_path / "modules.json").write_text(json.dumps(kept))
    with caplog.at_level("WARNING", logger="flexbert"):
        FlexBertForSentenceEmbedding.from_hf(tmp_path)
    assert "no Normalize module" in caplog.text
    dense = {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"}
    (tmp_path / "modules.json").write_text(json.dumps([modules[0], dense]))
    with pytest.raises(ConfigError, match="no FlexBERT counterpart"):
        FlexBertForSentenceEmbedding.from_hf(tmp_path)


def test_a_sentence_transformers_model_with_a_dense_layer_is_refused(tmp_path):
    """Its vectors pass through a projection FlexBertForSentenceEmbedding does not have."""
    st = pytest.importorskip("sentence_transformers")
    FlexBertForSentenceEmbedding(ModelConfig.preset("tiny")).save_hf(tmp_path / "ours")
    _word_tokenizer(tmp_path / "ours")
    model = st.SentenceTransformer(str(tmp_path / "ours"), device="cpu")
    model.append(st.models.Dense(64, 8))
    model.save(str(tmp_path / "dense"))
    with pytest.raises(ConfigError, match="Dense.* no FlexBERT counterpart"):
        FlexBertForSentenceEmbedding.from_hf(tmp_path / "dense")
    FlexBertModel.from_hf(tmp_path / "dense")  # the encoder alone loads
