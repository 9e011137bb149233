"""Activation checkpointing: same gradients, far fewer activations kept for the backward."""

from __future__ import annotations

import pytest
import torch

from flexbert import FlexBertForMaskedLM, ModelConfig
from flexbert.model import FlexBertLayer
from tests.conftest import ragged_batch


def _step(model, inputs, labels, seed=0):
    """Loss, gradients and the number of tensors autograd kept for the backward."""
    kept = 0

    def pack(t):
        nonlocal kept
        kept += 1
        return t

    model.zero_grad()
    torch.manual_seed(seed)  # dropout draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, kept


@pytest.mark.parametrize("padding", ["unpadded", "padded"])
def test_checkpointed_layers_give_the_same_gradients_and_keep_less(padding):
    ids, mask = ragged_batch([40, 23, 31])
    labels = ids.masked_fill(~mask | (torch.rand(ids.shape) > 0.3), -100)
    cfg = ModelConfig.preset(
        "tiny", padding=padding, attention_dropout=0.1, mlp_dropout=0.1, sparse_prediction=True
    )
    model = FlexBertForMaskedLM(cfg).train()
    inputs = {"input_ids": ids, "attention_mask": mask}
    loss, grads, kept = _step(model, inputs, labels)
    model.set_activation_checkpointing(True)
    ck_loss, ck_grads, ck_kept = _step(model, inputs, labels)
    torch.testing.assert_close(ck_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(ck_grads[name], grad, msg=name)
    # each layer keeps only its input instead of every intermediate
    assert ck_kept < kept / 3, (ck_kept, kept)
    # dropout is live: another seed gives another loss, so the equality above is not trivial
    other = _step(model, inputs, labels, seed=1)[1]
    assert not torch.allclose(
        other["model.layers.0.mlp.Wo.weight"], grads["model.layers.0.mlp.Wo.weight"]
    )
    model.set_activation_checkpointing(False)
    assert _step(model, inputs, labels)[2] == kept


def test_no_checkpointing_without_gradients(monkeypatch):
    """Inference with checkpointing on runs the layers plainly (nothing to recompute)."""
    import flexbert.model

    calls = []
    real = flexbert.model.checkpoint
    monkeypatch.setattr(
        flexbert.model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny"))
    model.set_activation_checkpointing(True)
    ids, mask = ragged_batch([12, 7])
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert calls == []
    model(ids, attention_mask=mask)
    assert len(calls) == model.config.num_layers


def test_fsdp_units_and_checkpoints_are_the_encoder_layers():
    """What Composer's FSDP asks the wrapped model: one unit / checkpoint per layer."""
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny"))
    wrapped = [m for m in model.modules() if model.fsdp_wrap_fn(m)]
    assert wrapped == list(model.model.layers)
    assert all(isinstance(m, FlexBertLayer) for m in wrapped)
    checkpointed = [m for m in model.modules() if model.activation_checkpointing_fn(m)]
    assert checkpointed == wrapped


@pytest.mark.slow
def test_checkpointing_inside_compiled_layers_gives_the_same_gradients():
    """With compile_layers the checkpoint is traced inside each layer's graph (checkpointing a
    compiled layer from outside would recompute through another graph and fail)."""
    ids, mask = ragged_batch([40, 23, 31])
    labels = ids.masked_fill(~mask | (torch.rand(ids.shape) > 0.3), -100)
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny", sparse_prediction=True))
    inputs = {"input_ids": ids, "attention_mask": mask}
    _, grads, kept = _step(model, inputs, labels)
    model.set_activation_checkpointing(True)
    model.compile_layers(dynamic=True)
    for _ in range(2):  # compile, then run the compiled graphs
        _, ck_grads, ck_kept = _step(model, inputs, labels)
    for name, grad in grads.items():
        torch.testing.assert_close(ck_grads[name], grad, msg=name)
    assert ck_kept < kept / 3, (ck_kept, kept)


def test_activation_memory_tool_sees_checkpointing_and_bf16():
    from flexbert.bench.activation_memory import main, measure

    fp32 = measure("tiny", rows=2, length=128, device="cpu", bf16=False)
    bf16 = measure("tiny", rows=2, length=128, device="cpu", bf16=True)
    assert 0 < fp32["checkpointed"] < fp32["plain"] / 3
    assert bf16["plain"] < 0.8 * fp32["plain"]  # half-size activations (some stay fp32)
    hidden = 2 * 128 * ModelConfig.preset("tiny").hidden_size * 4  # one fp32 layer input
    assert fp32["checkpointed"] >= ModelConfig.preset("tiny").num_layers * hidden
    assert main(["--size", "tiny", "--rows", "1", "--len", "64"]) == 0
