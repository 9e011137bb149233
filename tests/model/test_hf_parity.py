"""Parity with transformers ModernBERT in both directions, through flexbert.hf."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertModel,
    ModernBertConfig,
    ModernBertForMaskedLM,
    ModernBertForSequenceClassification,
    ModernBertModel,
)

from flexbert import (
    ConfigError,
    FlexBertForMaskedLM,
    FlexBertForSentenceEmbedding,
    FlexBertForSequenceClassification,
    FlexBertForTokenClassification,
    FlexBertModel,
    ModelConfig,
)
from flexbert.hf import CheckpointError
from tests.conftest import cache_hub_repo, offline_hub, ragged_batch

TOKENS = dict(pad_token_id=0, cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2)


def _hf_config(global_every: int, window: int, **kw) -> ModernBertConfig:
    return ModernBertConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=5,
        num_attention_heads=4,
        local_attention=window,
        global_attn_every_n_layers=global_every,
        max_position_embeddings=128,
        **TOKENS,
        **kw,
    )


def _perturb(model: torch.nn.Module) -> None:
    """Random norms and biases so a mapping mistake cannot hide behind ones and zeros."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("global_every", [2, 3])
@pytest.mark.parametrize("padding", ["unpadded", "padded"])
@pytest.mark.parametrize(
    "extra", [{}, {"norm_bias": True, "attention_bias": True, "mlp_bias": True}]
)
def test_from_hf_matches_transformers_masked_lm(tmp_path, global_every, padding, extra):
    hf = ModernBertForMaskedLM(_hf_config(global_every, window=8, **extra)).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = FlexBertForMaskedLM.from_hf(tmp_path, mask_token_id=3, padding=padding).eval()
    assert ours.config.layer_types[:3] == (
        ["global", "local", "global"] if global_every == 2 else ["global", "local", "local"]
    )
    ids, mask = ragged_batch([40, 23, 9, 40])  # window 8 << sequence
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert _rel_err(expected[mask], got[mask]) < 1e-4


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_from_hf_matches_transformers_sequence_classification(tmp_path, pooling):
    hf = ModernBertForSequenceClassification(
        _hf_config(3, window=8, num_labels=3, classifier_pooling=pooling)
    ).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = FlexBertForSequenceClassification.from_hf(tmp_path, mask_token_id=3).eval()
    ids, mask = ragged_batch([30, 12, 25])
    with torch.no_grad():
        assert (
            _rel_err(hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)
            < 1e-4
        )


@pytest.mark.parametrize("global_every", [2, 3])
def test_save_hf_loads_in_transformers_with_identical_outputs(tmp_path, global_every):
    cfg = ModelConfig.preset(
        "tiny",
        num_layers=5,
        attention_pattern={"name": "local_global", "window": 8, "global_every": global_every},
        norm={"name": "layernorm", "bias": True},
    )
    ours = FlexBertForMaskedLM(cfg).eval()
    _perturb(ours)
    ours.save_hf(tmp_path)
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = ragged_batch([33, 17, 33])
    with torch.no_grad():
        assert (
            _rel_err(
                ours(ids, attention_mask=mask).logits[mask],
                hf(ids, attention_mask=mask).logits[mask],
            )
            < 1e-4
        )
    # and back again, through the files only
    again = FlexBertForMaskedLM.from_hf(tmp_path).eval()
    assert again.config.to_dict() == cfg.replace(backend="auto").to_dict()


@pytest.mark.parametrize("cls", [FlexBertForSequenceClassification, FlexBertForTokenClassification])
def test_save_hf_task_heads_load_with_auto_classes(tmp_path, cls):
    auto = (
        AutoModelForSequenceClassification
        if cls is FlexBertForSequenceClassification
        else AutoModelForTokenClassification
    )
    ours = cls(ModelConfig.preset("tiny", num_labels=4, pooling="mean")).eval()
    ours.save_hf(tmp_path)
    hf = auto.from_pretrained(tmp_path).eval()
    ids, mask = ragged_batch([20, 14])
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    if cls is FlexBertForTokenClassification:
        a, b = a[mask], b[mask]
    assert _rel_err(b, a) < 1e-4


def test_classifier_fine_tuning_starts_from_a_masked_lm_checkpoint(tmp_path, caplog):
    mlm = FlexBertForMaskedLM(ModelConfig.preset("tiny"))
    mlm.save_hf(tmp_path)
    with caplog.at_level("WARNING", logger="flexbert"):
        clf = FlexBertForSequenceClassification.from_hf(tmp_path, num_labels=5)
        FlexBertForMaskedLM.from_hf(tmp_path)  # every layer from the checkpoint: no warning
    assert caplog.messages == [f"{tmp_path}: classifier not in the checkpoint, initialised fresh"]
    torch.testing.assert_close(clf.model.layers[2].mlp.Wi.weight, mlm.model.layers[2].mlp.Wi.weight)
    assert clf.classifier.out_features == 5
    encoder = FlexBertModel.from_hf(tmp_path)
    torch.testing.assert_close(encoder.final_norm.weight, mlm.model.final_norm.weight)
    embedder = FlexBertForSentenceEmbedding.from_hf(tmp_path)  # no prediction head of its own
    torch.testing.assert_close(
        embedder.model.layers[1].attn.Wo.weight, mlm.model.layers[1].attn.Wo.weight
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"norm": "rmsnorm"}, "norm 'rmsnorm'"),
        ({"position": "absolute"}, "position 'absolute'"),
        ({"mlp": "mlp"}, "mlp 'mlp'"),
        ({"qkv_bias": True}, "qkv_bias != attn_out_bias"),
        ({"final_norm": False}, "final_norm=False"),
    ],
)
def test_save_hf_refuses_what_modernbert_cannot_express(tmp_path, overrides, needle):
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny", **overrides))
    with pytest.raises(ConfigError, match="cannot be saved as Hugging Face ModernBERT") as err:
        model.save_hf(tmp_path)
    assert needle in str(err.value)
    assert not (tmp_path / "model.safetensors").exists()


def test_checkpoint_with_missing_and_unexpected_keys_lists_them(tmp_path):
    from safetensors.torch import load_file, save_file

    FlexBertForMaskedLM(ModelConfig.preset("tiny")).save_hf(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.attn.Wo.weight"]
    state["model.layers.1.attn.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        FlexBertForMaskedLM.from_hf(tmp_path)
    msg = str(err.value)
    assert "missing keys ['model.layers.1.attn.Wo.weight']" in msg
    assert "unexpected keys ['model.layers.1.attn.extra.weight']" in msg


def test_checkpoint_with_other_shapes_or_from_another_model_is_refused(tmp_path):
    FlexBertForMaskedLM(ModelConfig.preset("tiny")).save_hf(tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        FlexBertForMaskedLM.from_hf(tmp_path / "tiny")
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="holds a 'bert' checkpoint"):
        FlexBertForMaskedLM.from_hf(tmp_path / "bert")


def test_label_names_travel_both_ways_and_another_label_count_drops_them(tmp_path):
    hf = ModernBertForSequenceClassification(
        _hf_config(3, window=8, num_labels=3, id2label={0: "NEG", 1: "NEU", 2: "POS"})
    )
    hf.save_pretrained(tmp_path / "hf")
    ours = FlexBertForSequenceClassification.from_hf(tmp_path / "hf", mask_token_id=3)
    assert ours.config.label_names == ["NEG", "NEU", "POS"]
    ours.save_hf(tmp_path / "ours")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours")
    assert loaded.config.id2label == {0: "NEG", 1: "NEU", 2: "POS"}
    assert loaded.config.label2id == {"NEG": 0, "NEU": 1, "POS": 2}
    assert ours.config.replace(num_labels=2).label_names is None  # they no longer fit
    assert FlexBertModel.from_hf(tmp_path / "ours", num_labels=2).config.label_names is None
    with pytest.raises(ConfigError, match="label_names: 3 distinct names"):
        ModelConfig.preset("tiny", num_labels=3, label_names=["a", "a", "b"])


def test_dropout_settings_survive_a_save_hf_round_trip(tmp_path):
    """ModernBERT pretrained with 0.1 on the attention output and 0.0 on the probabilities;
    transformers has one knob for both, so FlexBERT keeps its own as an extra attribute."""
    dropouts = dict(
        embedding_dropout=0.05, attention_dropout=0.0, attention_out_dropout=0.1, mlp_dropout=0.2
    )
    FlexBertForMaskedLM(ModelConfig.preset("tiny", **dropouts)).save_hf(tmp_path / "split")
    loaded = FlexBertForMaskedLM.from_hf(tmp_path / "split").config
    assert {name: getattr(loaded, name) for name in dropouts} == dropouts
    FlexBertForMaskedLM(ModelConfig.preset("tiny", attention_dropout=0.1)).save_hf(tmp_path / "one")
    assert FlexBertForMaskedLM.from_hf(tmp_path / "one").config.attention_out_dropout is None


def test_saving_a_model_with_bf16_rope_says_transformers_rotates_in_fp32(tmp_path, caplog):
    model = FlexBertForMaskedLM(
        ModelConfig.preset("tiny", position={"name": "rope", "fp32": False})
    )
    with caplog.at_level("WARNING", logger="flexbert"):
        model.save_hf(tmp_path)
    assert "position.fp32=false" in caplog.text
    assert AutoModelForMaskedLM.from_pretrained(tmp_path) is not None


def test_an_untied_mlm_decoder_is_refused_and_its_encoder_still_loads(tmp_path):
    """FlexBERT ties the decoder to the token embedding: a checkpoint with its own decoder
    (tie_word_embeddings=false) once loaded with the decoder written over the embedding."""
    hf = ModernBertForMaskedLM(_hf_config(3, window=8, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        hf.decoder.weight.add_(torch.randn_like(hf.decoder.weight))
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="tie_word_embeddings=false"):
        FlexBertForMaskedLM.from_hf(tmp_path, mask_token_id=3)
    encoder = FlexBertModel.from_hf(tmp_path, mask_token_id=3).eval()
    ids, mask = ragged_batch([20, 9])
    with torch.no_grad():
        expected = hf.model(ids, attention_mask=mask).last_hidden_state
        got = encoder(ids, attention_mask=mask).last_hidden_state
    assert _rel_err(expected[mask], got[mask]) < 1e-4


@pytest.mark.parametrize("activation", ["gelu_python", "gelu_new", "gelu_python_tanh", "swish"])
def test_transformers_other_names_of_an_activation_load_with_the_same_outputs(tmp_path, activation):
    hf = ModernBertForMaskedLM(_hf_config(3, window=8, hidden_activation=activation)).eval()
    hf.save_pretrained(tmp_path)
    ours = FlexBertForMaskedLM.from_hf(tmp_path, mask_token_id=3).eval()
    ids, mask = ragged_batch([20, 9])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert _rel_err(expected[mask], got[mask]) < 1e-4


def test_a_stored_decoder_unlike_the_embedding_is_refused_even_when_the_config_says_tied(
    tmp_path,
):
    """config.json says (or defaults to) tie_word_embeddings=true, yet the weights hold a
    different decoder: transformers then keeps both apart, and FlexBERT's one shared parameter
    would have taken the decoder's values in place of the embedding's."""
    import json

    hf = ModernBertForMaskedLM(_hf_config(3, window=8, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        hf.decoder.weight.add_(torch.randn_like(hf.decoder.weight))
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("tie_word_embeddings", None)  # the default: tied
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    embedding = reloaded.model.embeddings.tok_embeddings.weight
    assert not torch.equal(reloaded.decoder.weight, embedding)  # transformers: not tied
    with pytest.raises(CheckpointError, match="own MLM decoder"):
        FlexBertForMaskedLM.from_hf(tmp_path, mask_token_id=3)


def test_hf_settings_flexbert_reads_differently_are_mapped_or_refused(tmp_path):
    """An odd local_attention is the even window below it (ModernBERT attends |i - j| <=
    local_attention // 2); a sparse_pred_ignore_index other than -100 is refused."""
    hf = ModernBertForMaskedLM(_hf_config(2, window=9)).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path / "odd")
    ours = FlexBertForMaskedLM.from_hf(tmp_path / "odd", mask_token_id=3).eval()
    ids, mask = ragged_batch([40, 17])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        assert _rel_err(expected[mask], ours(ids, attention_mask=mask).logits[mask]) < 1e-4
    ModernBertForMaskedLM(_hf_config(2, window=8, sparse_pred_ignore_index=-1)).save_pretrained(
        tmp_path / "ignore"
    )
    with pytest.raises(ConfigError, match="sparse_pred_ignore_index=-1"):
        FlexBertForMaskedLM.from_hf(tmp_path / "ignore", mask_token_id=3)


def test_missing_directory_or_weights_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        FlexBertForMaskedLM.from_hf(tmp_path / "empty")
    FlexBertForMaskedLM(ModelConfig.preset("tiny")).save_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        FlexBertForMaskedLM.from_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        FlexBertForMaskedLM.from_hf(tmp_path)


def test_from_hf_reads_pytorch_bin_and_sharded_safetensors(tmp_path):
    hf = ModernBertForMaskedLM(_hf_config(3, window=8)).eval()
    _perturb(hf)
    hf.config.save_pretrained(tmp_path / "bin")  # an older checkpoint: weights as a torch pickle
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert (tmp_path / "bin" / "pytorch_model.bin").exists()
    ids, mask = ragged_batch([21, 30])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits[mask]
        for sub in ("bin", "sharded"):
            ours = FlexBertForMaskedLM.from_hf(tmp_path / sub, mask_token_id=3).eval()
            assert _rel_err(expected, ours(ids, attention_mask=mask).logits[mask]) < 1e-4


def test_hub_ids_load_from_the_hugging_face_cache(monkeypatch, tmp_path):
    cache = offline_hub(monkeypatch, tmp_path)
    mlm = FlexBertForMaskedLM(ModelConfig.preset("tiny")).eval()
    mlm.save_hf(tmp_path / "export")
    cache_hub_repo(cache, "flexbert-tests/tiny-mlm", tmp_path / "export")
    loaded = FlexBertForMaskedLM.from_hf("flexbert-tests/tiny-mlm").eval()
    ids, mask = ragged_batch([12, 9])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, attention_mask=mask).logits, mlm(ids, attention_mask=mask).logits
        )
    clf = FlexBertForSequenceClassification.from_hf("flexbert-tests/tiny-mlm", num_labels=2)
    torch.testing.assert_close(clf.model.final_norm.weight, mlm.model.final_norm.weight)


def test_missing_paths_and_uncached_hub_ids_say_what_was_tried(monkeypatch, tmp_path):
    offline_hub(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory.*Hub id"):
        FlexBertForMaskedLM.from_hf(tmp_path / "not" / "there")
    with pytest.raises(FileNotFoundError, match="'flexbert-tests/absent' is not a local directory"):
        FlexBertForMaskedLM.from_hf("flexbert-tests/absent")


@pytest.mark.parametrize("padding", ["unpadded", "padded"])
@pytest.mark.parametrize("window", [64, 8], ids=["keys-in-reach", "some-rows-without-keys"])
def test_keep_padding_gives_masked_positions_the_outputs_transformers_gives_them(
    tmp_path, padding, window
):
    """A masked position is no key, but its own output attends to the real tokens in its
    window (none: a zero attention output), as transformers' sdpa attention gives it: what
    ColBERT's unattended [MASK] tokens score."""
    hf = ModernBertModel(_hf_config(2, window=window)).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = FlexBertModel.from_hf(tmp_path, mask_token_id=3, padding=padding).eval()
    ids, mask = ragged_batch([40, 23, 9, 40])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).last_hidden_state
        got, layout = ours.encode(ids, mask, keep_padding=True)
        plain = ours(ids, attention_mask=mask).last_hidden_state
    assert layout.padded and got.shape == expected.shape
    assert _rel_err(expected, got) < 1e-4  # every position, the masked ones too
    assert _rel_err(expected[mask], plain[mask]) < 1e-4
    ours.config = ours.config.replace(backend="varlen")  # (a GPU-only backend: not built here)
    with pytest.raises(ValueError, match="keep_padding needs the padded layout.*'varlen'"):
        ours.encode(ids, mask, keep_padding=True)
