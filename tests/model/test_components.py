"""Registries: names match conf/ YAML files, and every option builds and trains a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from flexbert import (
    FlexBertForMaskedLM,
    FlexBertForSequenceClassification,
    FlexBertModel,
    ModelConfig,
)
from flexbert.config import COMPONENT_FIELDS
from tests.conftest import ragged_batch

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
# conf/model/<folder>/ -> the ModelConfig field whose registry it mirrors
FOLDERS = {name: name for name in COMPONENT_FIELDS if name != "head_activation"}


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_conf_folder_holds_one_yaml_per_registered_name(folder):
    registry = COMPONENT_FIELDS[FOLDERS[folder]]
    files = sorted(p.stem for p in (CONF / folder).glob("*.yaml"))
    assert files == registry.names()
    for path in (CONF / folder).glob("*.yaml"):
        node = yaml.safe_load(path.read_text())
        assert node["name"] == path.stem
        registry.config(node, field=folder)  # every YAML validates against its dataclass


def test_conf_size_folder_holds_the_presets():
    from flexbert.config import PRESETS

    assert sorted(p.stem for p in (CONF / "size").glob("*.yaml")) == sorted(PRESETS)


def _options():
    for field, registry in COMPONENT_FIELDS.items():
        for name in registry.names():
            if field == "backend" and name in ("varlen", "flash_attn"):
                continue  # GPU / optional package: covered by the refusal tests
            yield field, name


@pytest.mark.parametrize(("field", "name"), list(_options()))
@pytest.mark.parametrize("padding", ["unpadded", "padded"])
def test_every_option_builds_runs_forward_and_backward(field, name, padding):
    overrides = {field: name, "padding": padding}
    if field == "attention_pattern" and name == "explicit":
        overrides[field] = {"name": "explicit", "types": ["global", "local", "local", "global"]}
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny", **overrides))
    ids, mask = ragged_batch([19, 11])
    labels = ids.masked_fill(~mask, -100)
    if field == "backend" and name == "flex":  # no flex backward on the CPU: forward only
        with torch.no_grad():
            assert torch.isfinite(model(ids, attention_mask=mask, labels=labels).loss)
        with pytest.raises(RuntimeError, match="no backward pass on the CPU"):
            model(ids, attention_mask=mask, labels=labels)
        return
    out = model(ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_init_scheme_scales_output_projections():
    model = FlexBertForMaskedLM(
        ModelConfig.preset("tiny", hidden_size=256, intermediate_size=384, num_layers=8)
    )
    std_in = model.model.layers[3].attn.Wqkv.weight.std().item()
    std_out = model.model.layers[3].attn.Wo.weight.std().item()
    # truncated at 2 std: the sample std is ~0.88 of the nominal one
    assert std_in == pytest.approx(0.02 * 0.88, rel=0.05)
    assert std_out == pytest.approx(0.02 / (2 * 8) ** 0.5 * 0.88, rel=0.05)
    assert model.model.layers[3].attn.Wqkv.weight.abs().max() <= 0.04 + 1e-6


@pytest.mark.parametrize("init, head_std", [("hf_trunc_normal", 0.005), ("megatron", 0.02)])
def test_the_mlm_head_dense_std_follows_the_scheme(init, head_std):
    """Hugging Face gives the MLM head's dense layer the output std (0.02 / sqrt(2 * 8)); the
    ModernBERT training code (megatron) the input std. A classifier's head is an output
    projection in both."""
    cfg = ModelConfig.preset(
        "tiny", hidden_size=256, intermediate_size=384, num_layers=8, init={"name": init}
    )
    mlm = FlexBertForMaskedLM(cfg)
    assert mlm.head.dense.weight.std().item() == pytest.approx(head_std * 0.88, rel=0.08)
    assert mlm.model.layers[3].attn.Wo.weight.std().item() == pytest.approx(0.005 * 0.88, rel=0.08)
    classifier = FlexBertForSequenceClassification(cfg.replace(num_labels=2))
    assert classifier.head.dense.weight.std().item() == pytest.approx(0.005 * 0.88, rel=0.08)


def test_compiled_model_matches_eager_on_cpu():
    """torch.compile of the whole model: dynamo captures it around the data-dependent entry
    (unpadding, graph breaks) and AOT autograd functionalises it, same outputs. Inductor's
    kernels are checked on the path training compiles (`compile_layers`, below); here they
    would add 40 s of C++ generation on 2 CPU cores for the few ops outside the layers."""
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny", backend="sdpa")).eval()
    ids, mask = ragged_batch([16, 16])
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(ids, attention_mask=mask).logits,
            model(ids, attention_mask=mask).logits,
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.slow
def test_compiled_layers_keep_compiling_across_kinds_of_batch():
    """A compiled layer needs a graph per layer kind, mask-cache state, padding and window
    path: with dynamo's default limit (8) a third kind of batch left every layer eager.
    Graph capture and recompilation are dynamo's, whatever backend then compiles the graphs:
    the eager backend counts them without inductor's minutes of C++ code generation."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = FlexBertModel(ModelConfig.preset("tiny", backend="sdpa")).eval()
    model.compile_layers(dynamic=True, backend="eager")
    graphs = []
    for shape, padded in [((2, 40), True), ((2, 64), False), ((2, 130), True)]:
        ids, mask = torch.randint(5, 100, shape), torch.ones(shape, dtype=torch.long)
        if padded:
            mask[0, -5:] = 0
        with torch.no_grad():
            model(ids, attention_mask=mask)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] > graphs[-2] > 0  # the third kind compiled too
    assert counters["frames"]["total"] == counters["frames"]["ok"]  # no frame left eager


def test_compiled_layers_match_eager_on_cpu():
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny", backend="sdpa")).eval()
    ids, mask = ragged_batch([16, 9])
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        model.compile_layers()
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_rope_in_the_activation_dtype_rounds_like_bf16_math():
    from flexbert.components.position import RotaryPosition, apply_rotary

    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(10, 4, 16, generator=gen).bfloat16() for _ in range(2))
    cos, sin, _ = RotaryPosition(16, {"global": 10_000.0}).rotary(torch.arange(10), torch.bfloat16)[
        "global"
    ]
    c, s = cos[:, None], sin[:, None]
    q16, _ = apply_rotary(q, k, cos, sin, fp32=False)
    torch.testing.assert_close(q16, q * c + q.roll(8, dims=-1) * s, rtol=0, atol=0)
    q32, _ = apply_rotary(q, k, cos, sin, fp32=True)
    qf = q.float()
    expected = (qf * c.float() + qf.roll(8, dims=-1) * s.float()).bfloat16()
    torch.testing.assert_close(q32, expected, rtol=0, atol=0)
    assert not torch.equal(q16, q32)  # the two really round differently
    torch.testing.assert_close(q16.float(), q32.float(), rtol=2e-2, atol=2e-2)


def test_bf16_rope_model_stays_close_to_the_fp32_rope_model():
    ids, mask = ragged_batch([24, 17])
    exact = FlexBertForMaskedLM(ModelConfig.preset("tiny")).eval()
    fast = FlexBertForMaskedLM(
        ModelConfig.preset("tiny", position={"name": "rope", "fp32": False})
    ).eval()
    fast.load_state_dict(exact.state_dict())
    with torch.no_grad():
        same = fast(ids, attention_mask=mask).logits
        torch.testing.assert_close(same, exact(ids, attention_mask=mask).logits)  # fp32 model
        a = exact.bfloat16()(ids, attention_mask=mask).logits.float()
        b = fast.bfloat16()(ids, attention_mask=mask).logits.float()
    assert (a - b).abs().max() < 0.1 * a.abs().max()
