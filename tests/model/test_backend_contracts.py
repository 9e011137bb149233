"""The GPU-only backends' calls, checked on the CPU against each kernel's documented contract.

varlen_attn and flash-attn run only on CUDA, so here they are replaced by a plain reference
of the same signature (sliding window `window_size=(left, right)`: key j is visible from query
i when i - left <= j <= i + right, within one sequence). What is tested is FlexBERT's side:
the arguments it passes (int32 cu_seqlens, host int max_seqlen, window, scale, layout) and
that the result equals the eager reference (in bf16: the kernels take bf16/fp16 only). The
kernels themselves are covered on a GPU by tests/model/test_gpu_backends.py and
flexbert/bench/gpu_checks.py.
"""

from __future__ import annotations

import logging
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
    dtype, (q, k, v) = q.dtype, (t.float() for t in (q, k, v))  # a kernel's fp32 accumulation
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
    return out.to(dtype)


def eager_in_fp32(q, k, v, layout, half, scale):
    """The eager reference computed in fp32, rounded to q's dtype like a kernel's output."""
    out = backends.eager_attention(q.float(), k.float(), v.float(), layout, half, 0.0, scale)
    return out.to(q.dtype)


def _inputs(lengths=(19, 40, 3), dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(total, 4, 16, generator=gen).to(dtype) for _ in range(3))
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
    assert seen.get("window_size") == (None if half is None else (half, half))
    assert seen.get("scale") == (None if scale == 0.25 else scale)
    torch.testing.assert_close(got, eager_in_fp32(q, k, v, layout, half, scale))


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
    torch.testing.assert_close(got, eager_in_fp32(q, k, v, layout, half, 0.25))


@pytest.mark.parametrize("name", ["varlen", "flash_attn"])
def test_half_precision_kernels_refuse_fp32_naming_what_works(name):
    """Not the kernel's bare "FlashAttention only support fp16 and bf16": before the call."""
    fn = {"varlen": backends.varlen_attention, "flash_attn": backends.flash_attention}[name]
    q, k, v, layout = _inputs(dtype=torch.float32)
    with pytest.raises(TypeError, match=rf"backend '{name}'.*bf16/fp16.*torch.float32") as err:
        fn(q, k, v, layout, None, 0.0, 0.25)
    assert "autocast" in str(err.value) and "backend 'auto'" in str(err.value)


@pytest.fixture
def fresh_flash_attn(monkeypatch):
    """flash_attn_available() tries its import again here, and forgets the answer after."""
    monkeypatch.setattr(backends, "_HAS_FLASH_ATTN", None)
    monkeypatch.setattr(backends, "_FLASH_ATTN_ERROR", "")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)


def test_flash_attn_that_fails_to_import_counts_as_missing(
    fresh_flash_attn, monkeypatch, tmp_path, caplog
):
    """A flash-attn built for another torch is installed (find_spec sees it) but its import
    fails: `auto` must not pick it, and backend 'flash_attn' is refused, saying why."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.DEBUG, logger=backends.__name__):
        assert not backends.flash_attn_available()
    assert "undefined symbol" in caplog.text
    with pytest.raises(ConfigError, match="flash-attn package.*undefined symbol"):
        FlexBertModel(ModelConfig.preset("tiny", backend="flash_attn"))


def test_flash_attn_availability_is_an_import_tried_once(fresh_flash_attn, monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    assert backends.flash_attn_available()
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # now an import would fail
    assert backends.flash_attn_available()  # cached: inside compiled graphs, a constant


def test_auto_picks_sdpa_on_the_cpu_and_for_fp32():
    q, _, _, layout = _inputs(dtype=torch.float32)
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
