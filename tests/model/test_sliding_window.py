"""Chunked sliding-window sdpa against the dense band (eager) reference."""

from __future__ import annotations

import pytest
import torch

from flexbert import FlexBertModel, ModelConfig
from flexbert.attention import backends, sliding_window
from flexbert.layout import Layout
from tests.conftest import ragged_batch


def _padded_inputs(lengths, heads=3, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seqlen = max(lengths)
    q, k, v = (torch.randn(len(lengths), seqlen, heads, dim, generator=gen) for _ in range(3))
    mask = torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]
    positions = torch.arange(seqlen).expand(len(lengths), seqlen)
    has_padding = not bool(mask.all())
    return q, k, v, Layout(True, positions, attention_mask=mask, has_padding=has_padding)


@pytest.mark.parametrize("half", [4, 16, 40])
@pytest.mark.parametrize(
    "lengths",
    [[300, 300], [300, 171, 0, 33], [257]],
    ids=["equal", "ragged-with-empty-row", "one-past-a-chunk"],
)
def test_chunked_window_equals_the_dense_band(half, lengths):
    q, k, v, layout = _padded_inputs(lengths)
    assert sliding_window.worth_chunking(q.shape[1], half)
    got = backends.sdpa_attention(q, k, v, layout, half, 0.0, 0.3)
    assert ("chunked", half) in layout.cache  # the chunked path ran, not the dense mask
    expected = backends.eager_attention(q, k, v, layout, half, 0.0, 0.3)
    # every query, padding queries too (ColBERT's unattended [MASK] expansion tokens score
    # those rows): the real keys in the window, zero where there is none
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()  # rows with no key: no all-masked softmax


def test_chunked_window_gradients_equal_the_dense_band():
    q, k, v, layout = _padded_inputs([200, 150])
    grads = []
    for fn in (backends.sdpa_attention, backends.eager_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(
            *leaves,
            Layout(True, layout.positions, attention_mask=layout.attention_mask),
            8,
            0.0,
            0.35,
        )
        (out[layout.attention_mask] ** 2).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_window_edge_is_exact():
    """A key exactly `half` away is seen, one further is not (values one-hot per position)."""
    half, seqlen = 8, 160
    q = torch.zeros(1, seqlen, 1, 4)  # equal scores: the output is the mean of visible values
    v = torch.arange(seqlen, dtype=torch.float).view(1, seqlen, 1, 1).expand(1, seqlen, 1, 4)
    layout = Layout(
        True,
        torch.arange(seqlen)[None],
        attention_mask=torch.ones(1, seqlen, dtype=torch.bool),
        has_padding=False,
    )
    out = backends.sdpa_attention(q, q, v.contiguous(), layout, half, 0.0, 1.0)[0, :, 0, 0]
    visible_mean = torch.tensor(
        [(max(0, i - half) + min(seqlen - 1, i + half)) / 2 for i in range(seqlen)]
    )
    torch.testing.assert_close(out, visible_mean)


def test_short_sequences_keep_the_dense_mask():
    q, k, v, layout = _padded_inputs([60, 30])
    assert not sliding_window.worth_chunking(60, 8)
    backends.sdpa_attention(q, k, v, layout, 8, 0.0, 0.3)
    assert ("dense", 8) in layout.cache and ("chunked", 8) not in layout.cache


@pytest.mark.parametrize("padding", ["unpadded", "padded"])
def test_model_with_chunked_local_layers_matches_eager(padding):
    pattern = {"name": "local_global", "window": 16, "global_every": 3}
    lengths = [230, 97, 12, 230]
    ids, mask = ragged_batch(lengths)
    ref = FlexBertModel(ModelConfig.preset("tiny", backend="eager", attention_pattern=pattern))
    fast = FlexBertModel(
        ModelConfig.preset("tiny", backend="sdpa", padding=padding, attention_pattern=pattern)
    )
    fast.load_state_dict(ref.state_dict())
    assert sliding_window.worth_chunking(max(lengths), 8)
    with torch.no_grad():
        expected = ref.eval()(ids, attention_mask=mask).last_hidden_state[mask]
        got = fast.eval()(ids, attention_mask=mask).last_hidden_state[mask]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
