"""ModelConfig: presets, parameter counts, validation messages."""

from __future__ import annotations

import pytest
import torch

from flexbert import ConfigError, FlexBertForMaskedLM, FlexBertModel, ModelConfig


@pytest.mark.parametrize(
    ("preset", "encoder", "with_head"),
    [("base", 149_014_272, 149_655_232), ("large", 394_781_696, 395_881_664)],
)
def test_preset_parameter_counts_match_modernbert(preset, encoder, with_head):
    cfg = ModelConfig.preset(preset, backend="sdpa")
    with torch.device("meta"):  # shapes only: no memory, no init cost
        assert FlexBertModel(cfg).num_params() == encoder
        assert FlexBertForMaskedLM(cfg).num_params() == with_head  # tied decoder counted once


def test_base_layer_types_alternate_global_every_third():
    cfg = ModelConfig.preset("base")
    assert cfg.layer_types[:4] == ["global", "local", "local", "global"]
    assert cfg.layer_types.count("global") == 8
    assert cfg.vocab_size % 64 == 0


def test_overrides_accept_names_mappings_and_round_trip():
    cfg = ModelConfig.preset("tiny", norm={"name": "rmsnorm", "eps": 1e-6}, activation="silu")
    assert cfg.norm.name == "rmsnorm" and cfg.norm.eps == 1e-6
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"norm": "batchnorm"}, "valid choices are ['layernorm', 'rmsnorm']"),
        ({"norm": {"name": "layernorm", "epsilon": 1e-5}}, "unknown key(s) ['epsilon']"),
        ({"hidden_size": 65}, "hidden_size (65) must be divisible by num_heads"),
        ({"padding": "ragged"}, "valid choices are ['unpadded', 'padded']"),
        ({"attention_pattern": {"name": "local_global", "window": 7}}, "window must be an even"),
        ({"attention_pattern": {"name": "explicit", "types": ["global"]}}, "num_layers is 4"),
        ({"mask_token_id": 10_000}, "mask_token_id must be an integer in [0, vocab_size=512)"),
        ({"attention_dropout": 1.5}, "attention_dropout must be in [0, 1)"),
        ({"attention_out_dropout": "0.1"}, "attention_out_dropout must be a number (or null)"),
        ({"attention_pattern": {"name": "local_global", "window": 128.0}}, "window must be an"),
        ({"attention_pattern": {"name": "local_global", "global_every": 1.5}}, "an integer"),
        ({"norm": {"name": "layernorm", "eps": "1e-5"}}, "PyYAML reads 1e-5 as one"),
        ({"pad_token_id": True}, "pad_token_id must be an integer, got True"),
        ({"qkv_bias": "false"}, "qkv_bias must be true or false, got 'false'"),
        ({"position": {"name": "rope", "fp32": "false"}}, "fp32 must be true or false"),
        ({"backend": "cudnn"}, "unknown attention backend 'cudnn'"),
    ],
)
def test_bad_config_names_field_and_allowed_values(overrides, needle):
    with pytest.raises(ConfigError) as err:
        ModelConfig.preset("tiny", **overrides)
    assert needle in str(err.value)


def test_attention_output_dropout_is_its_own_knob_or_follows_attention_dropout():
    """ModernBERT pretrained with dropout 0.1 on the attention output and none on the
    probabilities; unset, the output follows attention_dropout (Hugging Face's one knob)."""
    from flexbert import FlexBertModel

    def dropouts(**overrides):
        attn = FlexBertModel(ModelConfig.preset("tiny", **overrides)).layers[1].attn
        return attn.attention_dropout, attn.out_drop.p

    assert dropouts(attention_out_dropout=0.1) == (0.0, 0.1)
    assert dropouts(attention_dropout=0.2) == (0.2, 0.2)
    assert dropouts(attention_dropout=0.2, attention_out_dropout=0.0) == (0.2, 0.0)


def test_unknown_top_level_key_and_preset_are_refused():
    with pytest.raises(ConfigError, match=r"unknown ModelConfig key\(s\) \['hiden_size'\]"):
        ModelConfig.from_dict({"hiden_size": 12})
    with pytest.raises(ConfigError, match="valid presets are"):
        ModelConfig.preset("huge")


def test_backend_that_cannot_run_here_is_refused_at_build_time():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA only"):
            FlexBertModel(ModelConfig.preset("tiny", backend="varlen"))
    with pytest.raises(ConfigError, match="padding='unpadded'"):
        FlexBertModel(ModelConfig.preset("tiny", backend="varlen", padding="padded"))
    with pytest.raises(ConfigError, match="attention_dropout=0"):
        FlexBertModel(ModelConfig.preset("tiny", backend="flex", attention_dropout=0.1))
