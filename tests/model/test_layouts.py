"""Every fast path against the reference: backends vs eager, padded vs unpadded, packed."""

from __future__ import annotations

import pytest
import torch

from flexbert import ConfigError, FlexBertForMaskedLM, FlexBertModel, ModelConfig
from tests.conftest import ragged_batch

CPU_BACKENDS = ["eager", "sdpa", "flex", "auto"]


def _model(**overrides) -> FlexBertModel:
    return FlexBertModel(ModelConfig.preset("tiny", **overrides)).eval()


def _assert_close_on_real_tokens(a, b, mask, rtol=1e-4):
    a, b = a[mask], b[mask]
    assert ((a - b).abs().max() / a.abs().max()).item() < rtol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", ["unpadded", "padded"])
@pytest.mark.parametrize(
    "pattern",
    [
        {"name": "local_global", "window": 8, "global_every": 2},
        {"name": "global"},
        {"name": "explicit", "types": ["local", "global", "local", "local"], "window": 4},
    ],
)
@pytest.mark.parametrize("lengths", [[37, 20, 5, 37], [37, 37, 37]], ids=["ragged", "equal"])
def test_backend_and_padding_match_eager_reference(backend, padding, pattern, lengths):
    ids, mask = ragged_batch(lengths)
    ref = _model(backend="eager", padding="padded", attention_pattern=pattern)
    fast = _model(backend=backend, padding=padding, attention_pattern=pattern)
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).last_hidden_state
        got = fast(ids, attention_mask=mask).last_hidden_state
    assert got.shape == expected.shape == (len(lengths), 37, 64)
    _assert_close_on_real_tokens(expected, got, mask)


def test_local_window_changes_the_output():
    """Guards the tests above: a window shorter than the sequence must matter."""
    ids, mask = ragged_batch([40, 40])
    local = _model(
        backend="eager", attention_pattern={"name": "local_global", "window": 4, "global_every": 2}
    )
    full = _model(backend="eager", attention_pattern="global")
    full.load_state_dict(local.state_dict())
    with torch.no_grad():
        assert not torch.allclose(
            local(ids, mask).last_hidden_state, full(ids, mask).last_hidden_state
        )


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_packed_sequences_equal_running_them_separately(backend):
    model = _model(backend=backend)
    lengths = [30, 7, 19, 1]
    seqs = [torch.randint(4, 512, (n,)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs), cu_seqlens=cu, max_seqlen=max(lengths)).last_hidden_state
        alone = [model(s[None]).last_hidden_state[0] for s in seqs]
    assert packed.shape == (sum(lengths), 64)
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_padded_unpadded_gradients_agree():
    ids, mask = ragged_batch([24, 11, 17])
    labels = ids.masked_fill(~mask, -100)
    grads = []
    for padding in ("padded", "unpadded"):
        torch.manual_seed(1)
        model = FlexBertForMaskedLM(ModelConfig.preset("tiny", backend="sdpa", padding=padding))
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append(model.model.layers[1].attn.Wqkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_sequence_longer_than_max_seq_len_is_refused():
    model = _model(max_seq_len=32)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        model(torch.randint(4, 512, (1, 33)))
    cu = torch.tensor([0, 10, 50], dtype=torch.int32)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        model(torch.randint(4, 512, (50,)), cu_seqlens=cu, max_seqlen=40)


def test_packed_input_needs_unpadded_layout():
    model = _model(padding="padded")
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ConfigError, match="padding='unpadded'"):
        model(torch.randint(4, 512, (5,)), cu_seqlens=cu, max_seqlen=5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_an_all_padding_row_keeps_outputs_and_gradients_finite(backend):
    ids, mask = ragged_batch([12, 12])
    mask[1] = False
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny", backend=backend, padding="padded"))
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(~mask, -100))
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_kept_padding_positions_agree_across_backends():
    """encode(keep_padding=True): a masked position's output (what ColBERT's unattended
    [MASK]s score) is the same on every backend, whether its window holds a real key or not
    (then its attention output is zero)."""
    ids, mask = ragged_batch([30, 7, 19])
    pattern = {"name": "local_global", "window": 8, "global_every": 2}
    outs = []
    for backend in ("eager", "sdpa", "flex"):
        torch.manual_seed(0)
        model = FlexBertModel(
            ModelConfig.preset("tiny", backend=backend, attention_pattern=pattern)
        )
        with torch.no_grad():
            outs.append(model.eval().encode(ids, mask, keep_padding=True)[0])
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=1e-4, atol=1e-5)
