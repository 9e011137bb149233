"""Extractive QA head: parity with transformers both ways, padding never an answer, layouts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, ModernBertForQuestionAnswering

from flexbert import ConfigError, FlexBertForQuestionAnswering, ModelConfig
from tests.conftest import ragged_batch
from tests.model.test_hf_parity import _hf_config, _perturb


def _positions(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    start = torch.tensor([int(torch.randint(0, n, (1,), generator=gen)) for n in lengths])
    end = torch.minimum(start + 3, torch.tensor(lengths) - 1)
    return start, end


def test_from_hf_matches_transformers_logits_and_loss(tmp_path):
    hf = ModernBertForQuestionAnswering(_hf_config(3, window=8)).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = FlexBertForQuestionAnswering.from_hf(tmp_path, mask_token_id=3).eval()
    lengths = [30, 30, 30]  # no padding: Hugging Face's loss also sees only real tokens
    ids, mask = ragged_batch(lengths)
    start, end = _positions(lengths)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, start_positions=start, end_positions=end)
        b = ours(ids, attention_mask=mask, start_positions=start, end_positions=end)
    torch.testing.assert_close(b.start_logits, a.start_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.end_logits, a.end_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-4, atol=1e-5)


def test_save_hf_loads_with_the_auto_class(tmp_path):
    ours = FlexBertForQuestionAnswering(ModelConfig.preset("tiny")).eval()
    ours.save_hf(tmp_path)
    hf = AutoModelForQuestionAnswering.from_pretrained(tmp_path).eval()
    ids, mask = ragged_batch([20, 14])
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask)
    torch.testing.assert_close(a.start_logits[mask], b.start_logits[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.end_logits[mask], b.end_logits[mask], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", ["unpadded", "padded"])
def test_padding_is_never_an_answer_and_layouts_agree(padding):
    torch.manual_seed(0)
    model = FlexBertForQuestionAnswering(ModelConfig.preset("tiny", padding=padding)).eval()
    lengths = [25, 9, 17]
    ids, mask = ragged_batch(lengths)
    start, end = _positions(lengths)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, start_positions=start, end_positions=end)
        per_sequence = [
            model(
                ids[i : i + 1, :n], start_positions=start[i : i + 1], end_positions=end[i : i + 1]
            )
            for i, n in enumerate(lengths)
        ]
    assert out.start_logits.shape == out.end_logits.shape == mask.shape
    assert (out.start_logits[~mask] == torch.finfo(torch.float32).min).all()
    assert (out.start_logits.argmax(-1) < torch.tensor(lengths)).all()
    expected = torch.stack([o.loss for o in per_sequence]).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_packed_batches_give_rows_of_max_seqlen():
    torch.manual_seed(0)
    model = FlexBertForQuestionAnswering(ModelConfig.preset("tiny")).eval()
    lengths = [25, 9, 17]
    ids, mask = ragged_batch(lengths)
    cu = torch.tensor([0, 25, 34, 51], dtype=torch.int32)
    start, end = _positions(lengths)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, start_positions=start, end_positions=end)
        packed = model(
            ids[mask], cu_seqlens=cu, max_seqlen=25, start_positions=start, end_positions=end
        )
    torch.testing.assert_close(packed.start_logits, padded.start_logits)
    torch.testing.assert_close(packed.loss, padded.loss)


def test_positions_outside_the_row_are_ignored():
    torch.manual_seed(0)
    model = FlexBertForQuestionAnswering(ModelConfig.preset("tiny")).eval()
    ids, mask = ragged_batch([20, 20])
    start, end = torch.tensor([3, 20]), torch.tensor([5, 20])  # the second: no answer here
    with torch.no_grad():
        both = model(ids, attention_mask=mask, start_positions=start, end_positions=end).loss
        first = model(ids[:1], start_positions=start[:1], end_positions=end[:1]).loss
    torch.testing.assert_close(both, first)


def test_question_answering_needs_two_outputs():
    with pytest.raises(ConfigError, match="num_labels must be 2, got 3"):
        FlexBertForQuestionAnswering(ModelConfig.preset("tiny", num_labels=3))
