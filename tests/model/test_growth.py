"""Growth from a smaller model: tilings, fused parts, layer maps, refusals."""

from __future__ import annotations

import pytest
import torch

from flexbert import (
    ConfigError,
    FlexBertForMaskedLM,
    FlexBertForSequenceClassification,
    FlexBertModel,
    ModelConfig,
    grow_model,
)
from flexbert.growth import TILE_MODES, layer_mapping, tile_tensor
from tests.conftest import ragged_batch

WIDE = dict(hidden_size=96, num_heads=6, intermediate_size=144, num_layers=6)


def _trained_like(cfg: ModelConfig) -> FlexBertForMaskedLM:
    """A tiny MLM with distinctive (non-init) values everywhere, norms and biases included."""
    model = FlexBertForMaskedLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("mode", TILE_MODES)
@pytest.mark.parametrize("layer_map", ["gopher", "cyclic"])
def test_equal_sizes_copy_the_model_exactly(mode, layer_map):
    cfg = ModelConfig.preset("tiny")
    source, target = _trained_like(cfg), FlexBertForMaskedLM(cfg).eval()
    report = grow_model(target, source, tile_mode=mode, layer_map=layer_map)
    assert report.layer_map == [0, 1, 2, 3] and not report.kept_init and not report.dropped
    ids, mask = ragged_batch([20, 13])
    with torch.no_grad():
        torch.testing.assert_close(
            target(ids, attention_mask=mask).logits, source(ids, attention_mask=mask).logits
        )


def test_tilings_along_one_dimension():
    old = torch.arange(3.0)
    new = torch.full((7,), -1.0)
    # center: the source block in the middle, the rest untouched
    assert tile_tensor(old, new, "center").tolist() == [-1, -1, 0, 1, 2, -1, -1]
    # edge: repeat from index 0
    assert tile_tensor(old, new, "edge").tolist() == [0, 1, 2, 0, 1, 2, 0]
    # middle: repeat so a whole copy sits at the centre (offset 2)
    assert tile_tensor(old, new, "middle").tolist() == [1, 2, 0, 1, 2, 0, 1]
    assert tile_tensor(old, new, "center").data_ptr() != new.data_ptr()  # a new tensor


def test_two_dimensional_tiling_covers_both_axes():
    old = torch.arange(6.0).view(2, 3)
    new = torch.zeros(4, 5)
    edge = tile_tensor(old, new, "edge")
    for i in range(4):
        for j in range(5):
            assert edge[i, j] == old[i % 2, j % 3]
    center = tile_tensor(old, new, "center")
    torch.testing.assert_close(center[1:3, 1:4], old)
    assert center.sum() == old.sum()  # zeros elsewhere, as in `new`


def test_fused_qkv_and_glu_parts_grow_from_their_own_parts():
    source = _trained_like(ModelConfig.preset("tiny"))
    target = FlexBertForMaskedLM(ModelConfig.preset("tiny", **WIDE))
    grow_model(target, source, tile_mode="center", layer_map="gopher")
    d_old, d_new = 64, 96
    lo = (d_new - d_old) // 2
    src_qkv = source.model.layers[3].attn.Wqkv.weight
    tgt_qkv = target.model.layers[5].attn.Wqkv.weight  # gopher: 5 * 4 // 6 = 3
    for part in range(3):  # q, k, v
        s = src_qkv[part * d_old : (part + 1) * d_old]
        t = tgt_qkv[part * d_new : (part + 1) * d_new]
        torch.testing.assert_close(t[lo : lo + d_old, lo : lo + d_old], s)
    i_old, i_new = 96, 144
    ilo = (i_new - i_old) // 2
    src_wi, tgt_wi = source.model.layers[3].mlp.Wi.weight, target.model.layers[5].mlp.Wi.weight
    for part in range(2):  # input, gate
        s = src_wi[part * i_old : (part + 1) * i_old]
        t = tgt_wi[part * i_new : (part + 1) * i_new]
        torch.testing.assert_close(t[ilo : ilo + i_old, lo : lo + d_old], s)


def test_grown_model_runs_and_reports_what_it_did():
    source = _trained_like(ModelConfig.preset("tiny"))
    target = FlexBertForMaskedLM(ModelConfig.preset("tiny", **WIDE))
    report = grow_model(target, source, tile_mode="middle", layer_map="gopher")
    assert report.layer_map == [0, 1, 1, 2, 3, 3]  # round(i * 4 / 6), as the reference code
    # only target layer 0 grows from source layer 0, and both lack the attention pre-norm
    # (skip_first_prenorm): every target weight has a source; the final norm stays fresh, as
    # in the reference code (equal sizes copy it: test_equal_sizes_copy_the_model_exactly)
    assert report.kept_init == ["model.final_norm.weight"]
    assert torch.equal(target.model.final_norm.weight, torch.ones(96))
    assert report.copied["model.embeddings.norm.weight"] == "model.embeddings.norm.weight"
    assert report.copied["model.layers.4.mlp.Wo.weight"] == "model.layers.3.mlp.Wo.weight"
    torch.testing.assert_close(  # the decoder stays tied to the grown embedding
        target.decoder.weight, target.model.embeddings.tok_embeddings.weight
    )
    ids, mask = ragged_batch([20, 13])
    out = target(ids, attention_mask=mask)
    assert out.logits.shape == (2, 20, 512) and torch.isfinite(out.logits).all()


def test_growing_into_a_classifier_drops_the_decoder_and_keeps_a_fresh_classifier():
    source = _trained_like(ModelConfig.preset("tiny"))
    target = FlexBertForSequenceClassification(ModelConfig.preset("tiny", num_labels=3))
    fresh = target.classifier.weight.detach().clone()
    report = grow_model(target, source)
    assert report.dropped == ["decoder.bias"]
    assert report.copied["head.dense.weight"] == "head.dense.weight"  # as transformers loads it
    assert "classifier.weight" in report.kept_init
    torch.testing.assert_close(target.classifier.weight, fresh)
    torch.testing.assert_close(
        target.model.layers[2].mlp.Wo.weight, source.model.layers[2].mlp.Wo.weight
    )


def test_bare_encoder_names_line_up_with_task_models():
    source = _trained_like(ModelConfig.preset("tiny"))
    target = FlexBertModel(ModelConfig.preset("tiny"))
    grow_model(target, source)
    torch.testing.assert_close(
        target.embeddings.tok_embeddings.weight, source.model.embeddings.tok_embeddings.weight
    )


def test_layer_maps():
    gopher = layer_mapping(22, 28, "gopher")
    assert len(gopher) == 28 and sorted(set(gopher)) == list(range(22))
    assert gopher == sorted(gopher)  # order kept: each source layer repeated in place
    assert gopher[:6] == [0, 1, 2, 2, 3, 4]  # round(i * 22 / 28), as the reference code
    assert layer_mapping(2, 5, "gopher") == [0, 0, 1, 1, 1]  # never past the last layer
    assert layer_mapping(2, 5, "cyclic") == [0, 1, 0, 1, 0]
    with pytest.raises(ConfigError, match="fewer"):
        layer_mapping(6, 4)
    with pytest.raises(ConfigError, match="layer_map must be one of"):
        layer_mapping(2, 4, "stretch")


def test_refusals_name_the_problem():
    source = _trained_like(ModelConfig.preset("tiny", **WIDE))
    with pytest.raises(ConfigError, match="fewer"):
        grow_model(FlexBertForMaskedLM(ModelConfig.preset("tiny")), source)
    small = _trained_like(ModelConfig.preset("tiny"))
    with pytest.raises(ConfigError, match="vocab_size differs"):
        grow_model(FlexBertForMaskedLM(ModelConfig.preset("tiny", vocab_size=576)), small)
    with pytest.raises(ConfigError, match="mlp differs"):
        grow_model(FlexBertForMaskedLM(ModelConfig.preset("tiny", mlp="mlp")), small)
    with pytest.raises(ConfigError, match="tile_mode must be one of"):
        grow_model(FlexBertForMaskedLM(ModelConfig.preset("tiny")), small, tile_mode="corner")
    narrower = ModelConfig.preset("tiny", hidden_size=96, num_heads=6, intermediate_size=64)
    with pytest.raises(ConfigError, match="mlp.Wi.weight"):
        grow_model(FlexBertForMaskedLM(narrower), small)
    biased = _trained_like(ModelConfig.preset("tiny", qkv_bias=True))
    with pytest.raises(ConfigError, match="no place in the target"):
        grow_model(FlexBertForMaskedLM(ModelConfig.preset("tiny")), biased)
