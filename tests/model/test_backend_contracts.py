"""The GPU-only backends' calls, checked on the CPU against each kernel's documented contract.

varlen_attn and flash-attn run only on CUDA, so here they are replaced by a plain reference
of the same signature (sliding window `window_size=(left, right)`: key j is visible from query
i when i - left <= j <= i + right, within one sequence). What is tested is FlexBERT's side:
the arguments it passes (int32 cu_seqlens, host int max_seqlen, window, scale, layout) and
that the result equals the eager reference. The kernels themselves are covered on a GPU by
tests/model/test_gpu_backends.py and flexbert/bench/gpu_checks.py.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from flexbert import FlexBertModel, ModelConfig
from flexbert.attention import backends
from flexbert.layout import Layout, positions_from_cu_seqlens
from flexbert.registry import ConfigError


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1)):
    assert cu_q.dtype == torch.int32 and isinstance(max_q, int) and q.dim() == 3
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    left, right = window_size
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        scores = qs @ ks.transpose(-1, -2) * scale
        i = torch.arange(b - a)
        allowed = torch.ones(b - a, b - a, dtype=torch.bool)
        if left >= 0:
            allowed &= i[None, :] >= i[:, None] - left
        if right >= 0:
            allowed &= i[None, :] <= i[:, None] + right
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def _inputs(lengths=(19, 40, 3)):
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(total, 4, 16, generator=gen) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    layout = Layout(
        False, positions_from_cu_seqlens(cu, total), cu_seqlens=cu, max_seqlen=max(lengths)
    )
    return q, k, v, layout


@pytest.mark.parametrize(("half", "scale"), [(None, 0.25), (4, 0.25), (4, 0.3)])
def test_varlen_call_matches_eager(monkeypatch, half, scale):
    import torch.nn.attention.varlen as varlen

    seen = {}

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        seen.update(kwargs)  # only what differs from varlen_attn's defaults is passed
        window = kwargs.get("window_size", (-1, -1))
        return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, kwargs.get("scale"), window)

    monkeypatch.setattr(varlen, "varlen_attn", fake)
    q, k, v, layout = _inputs()  # head dim 16: the default scale is 0.25
    got = backends.varlen_attention(q, k, v, layout, half, 0.0, scale)
    expected = backends.eager_attention(q, k, v, layout, half, 0.0, scale)
    assert seen.get("window_size") == (None if half is None else (half, half))
    assert seen.get("scale") == (None if scale == 0.25 else scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("half", [None, 4])
def test_flash_attn_call_matches_eager(monkeypatch, half):
    def flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, window_size=(-1, -1)
    ):
        assert dropout_p == 0.0
        return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, window_size)

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    q, k, v, layout = _inputs()
    got = backends.flash_attention(q, k, v, layout, half, 0.0, 0.25)
    expected = backends.eager_attention(q, k, v, layout, half, 0.0, 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_auto_picks_sdpa_on_the_cpu_and_for_fp32():
    q, _, _, layout = _inputs()
    assert backends.resolve_auto(q, layout, 0.0) is backends.sdpa_attention


def test_varlen_without_a_window_serves_global_layers_only(monkeypatch):
    """torch 2.10's varlen_attn has no window_size: local layers go elsewhere, and asking for
    the varlen backend on a model with local layers says why."""
    from types import SimpleNamespace

    monkeypatch.setattr(backends, "_HAS_VARLEN", True)
    monkeypatch.setattr(backends, "_VARLEN_WINDOW", False)
    monkeypatch.setattr(backends, "_HAS_FLASH_ATTN", False)
    _, _, _, layout = _inputs()
    q = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # what resolve_auto looks at
    assert backends.resolve_auto(q, layout, 0.0) is backends.varlen_attention
    assert backends.resolve_auto(q, layout, 0.0, local=True) is backends.sdpa_attention
    with pytest.raises(ConfigError, match="no sliding window.*window_size came in torch 2.11"):
        FlexBertModel(ModelConfig.preset("tiny", backend="varlen"))
    with pytest.raises(ConfigError, match="runs on CUDA only"):  # a global model gets further
        FlexBertModel(
            ModelConfig.preset("tiny", backend="varlen", attention_pattern={"name": "global"})
        )
