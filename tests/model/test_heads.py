"""Task heads: MLM (dense vs sparse), classification, token classification, choice, embeddings."""

from __future__ import annotations

import pytest
import torch

from flexbert import (
    FlexBertForMaskedLM,
    FlexBertForMultipleChoice,
    FlexBertForSentenceEmbedding,
    FlexBertForSequenceClassification,
    FlexBertForTokenClassification,
    ModelConfig,
)
from tests.conftest import ragged_batch


def _mlm_labels(ids, mask, rate=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(ids.shape, generator=gen) < rate) & mask
    return ids.masked_fill(~chosen, -100)


@pytest.mark.parametrize("padding", ["unpadded", "padded"])
def test_sparse_prediction_gives_the_dense_loss(padding):
    ids, mask = ragged_batch([30, 18, 25])
    labels = _mlm_labels(ids, mask)
    dense = FlexBertForMaskedLM(ModelConfig.preset("tiny", padding=padding)).eval()
    sparse = FlexBertForMaskedLM(
        ModelConfig.preset("tiny", padding=padding, sparse_prediction=True)
    ).eval()
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():
        d = dense(ids, attention_mask=mask, labels=labels)
        s = sparse(ids, attention_mask=mask, labels=labels)
    assert s.logits.shape == ((labels != -100).sum().item(), 512)
    assert d.logits.shape == (3, 30, 512)
    torch.testing.assert_close(s.loss, d.loss)
    torch.testing.assert_close(s.logits, d.logits[labels != -100])


@pytest.mark.parametrize("layout", ["unpadded", "padded", "packed"])
def test_sparse_prediction_with_label_positions_equals_the_boolean_index(layout):
    """Positions found by the data loader (no host sync) pick the same tokens, logits, loss
    and gradients as the head's own boolean index, in every layout."""
    from flexbert.data.masking import label_positions

    ids, mask = ragged_batch([30, 18, 25])
    labels = _mlm_labels(ids, mask, seed=3)
    padding = "padded" if layout == "padded" else "unpadded"
    model = FlexBertForMaskedLM(
        ModelConfig.preset("tiny", padding=padding, sparse_prediction=True)
    ).eval()
    if layout == "packed":
        cu = torch.nn.functional.pad(mask.sum(1).cumsum(0), (1, 0)).int()
        inputs = {"input_ids": ids[mask], "cu_seqlens": cu, "max_seqlen": 30}
        labels = labels[mask]
    else:
        inputs = {"input_ids": ids, "attention_mask": mask}
    positions = label_positions(labels)
    assert positions.shape[0] == (labels != -100).sum() > 0
    found = model(**inputs, labels=labels)
    found.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    given = model(**inputs, labels=labels, label_positions=positions)
    given.loss.backward()
    torch.testing.assert_close(given.logits, found.logits)
    torch.testing.assert_close(given.loss, found.loss)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, a)
    # the positions are used, not ignored: other positions give other logits
    shifted = model(**inputs, labels=labels, label_positions=positions.flip(0))
    assert not torch.allclose(shifted.logits, given.logits)


def test_mlm_loss_ignores_padding_and_unlabelled_positions():
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny")).eval()
    ids, mask = ragged_batch([20, 9])
    labels = _mlm_labels(ids, mask)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        logits = out.logits[labels != -100]
        manual = torch.nn.functional.cross_entropy(logits, labels[labels != -100])
    torch.testing.assert_close(out.loss, manual)


def test_outputs_index_by_name_and_by_position_as_transformers_outputs_do():
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny")).eval()
    ids, mask = ragged_batch([6, 4])
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        with_loss = model(ids, attention_mask=mask, labels=_mlm_labels(ids, mask, rate=0.5))
    assert out[0] is out["logits"] is out.logits and out[1] is out.last_hidden_state
    assert with_loss[0] is with_loss.loss and with_loss[1] is with_loss.logits
    assert len(out.to_tuple()) == 2


def test_decoder_is_tied_to_the_token_embedding():
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny"))
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight


def test_packed_mlm_batch_equals_padded_batch():
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny")).eval()
    ids, mask = ragged_batch([21, 13, 8])
    labels = _mlm_labels(ids, mask)
    lengths = mask.sum(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, labels=labels)
        packed = model(ids[mask], cu_seqlens=cu, max_seqlen=21, labels=labels[mask])
    torch.testing.assert_close(packed.loss, padded.loss)
    torch.testing.assert_close(packed.logits, padded.logits[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "problem", ["single_label_classification", "regression", "multi_label_classification"]
)
def test_sequence_classification_losses(problem):
    num_labels = 1 if problem == "regression" else 3
    model = FlexBertForSequenceClassification(
        ModelConfig.preset("tiny", num_labels=num_labels, problem_type=problem)
    )
    ids, mask = ragged_batch([12, 7])
    labels = {
        "single_label_classification": torch.tensor([0, 2]),
        "regression": torch.tensor([0.5, -1.0]),
        "multi_label_classification": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
    }[problem]
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, num_labels)
    out.loss.backward()
    assert model.classifier.weight.grad is not None and out.loss.item() > 0


@pytest.mark.parametrize("padding", ["unpadded", "padded"])
def test_mean_pooling_ignores_padding(padding):
    model = FlexBertForSequenceClassification(
        ModelConfig.preset("tiny", pooling="mean", padding=padding)
    ).eval()
    ids, mask = ragged_batch([10, 10])
    noisy = ids.clone()
    noisy_mask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.bool)], dim=1)
    noisy = torch.cat([noisy, torch.randint(4, 512, (2, 6))], dim=1)  # garbage behind the mask
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits, model(noisy, attention_mask=noisy_mask).logits
        )


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_is_the_same_in_both_layouts_with_left_padding_and_an_empty_row(pooling):
    """Left padding, and a row of padding only (it pools to zeros: the head's output for a
    zero vector), classify alike in the padded and unpadded layouts; a left-padded row
    classifies as it would alone."""
    cfg = ModelConfig.preset("tiny", pooling=pooling, num_labels=3)
    weights = FlexBertForSequenceClassification(cfg).state_dict()
    ids, mask = ragged_batch([7, 10, 4])
    left_ids, left_mask = ids.clone(), mask.clone()
    left_ids[0] = torch.cat([ids[0, 7:], ids[0, :7]])  # row 0 padded on the left
    left_mask[0] = torch.cat([mask[0, 7:], mask[0, :7]])
    left_mask[2] = False  # row 2: padding only
    logits = {}
    for padding in ("unpadded", "padded"):
        model = FlexBertForSequenceClassification(cfg.replace(padding=padding)).eval()
        model.load_state_dict(weights)
        with torch.no_grad():
            logits[padding] = model(left_ids, attention_mask=left_mask).logits
            alone = model(ids[:1, :7], attention_mask=mask[:1, :7]).logits
            of_zeros = model.classify(torch.zeros(1, cfg.hidden_size))
        torch.testing.assert_close(logits[padding][:1], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[padding][2:], of_zeros)
    torch.testing.assert_close(logits["unpadded"], logits["padded"], atol=1e-5, rtol=1e-5)


def test_token_classification_shapes_and_loss():
    model = FlexBertForTokenClassification(ModelConfig.preset("tiny", num_labels=5))
    ids, mask = ragged_batch([15, 6])
    labels = torch.randint(0, 5, ids.shape).masked_fill(~mask, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 15, 5)
    manual = torch.nn.functional.cross_entropy(out.logits[mask], labels[mask])
    torch.testing.assert_close(out.loss, manual)


def test_multiple_choice_scores_each_choice():
    model = FlexBertForMultipleChoice(ModelConfig.preset("tiny")).eval()
    ids = torch.randint(4, 512, (2, 3, 11))
    out = model(ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    with torch.no_grad():  # each choice is scored on its own
        alone = model(ids[:, 1:2]).logits
    torch.testing.assert_close(alone[:, 0], out.logits[:, 1].detach(), rtol=1e-4, atol=1e-5)


def test_sentence_embeddings_are_normalised_and_contrastive_loss_trains():
    model = FlexBertForSentenceEmbedding(ModelConfig.preset("tiny", pooling="mean"))
    q, qm = ragged_batch([9, 14, 5], seed=1)
    d, dm = ragged_batch([20, 11, 16], seed=2)
    out = model(q, attention_mask=qm, candidates=(d, dm))
    assert out.embeddings.shape == (3, 64)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(3))
    assert out.logits.shape == (3, 3)
    out.loss.backward()
    assert model.model.layers[0].attn.Wqkv.weight.grad.abs().sum() > 0
