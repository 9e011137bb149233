"""Attention backends: one function per kernel, picked by name from a registry.

Every backend takes q, k, v in token-major layout, (T, H, D) unpadded or (B, L, H, D) padded,
plus the batch `Layout`, half the local window (None = global), dropout and scale, and
returns the same layout. `check` refuses, at build time, a backend that cannot run here.

- eager: plain math, the ground truth in tests (block-diagonal mask when unpadded).
- sdpa: torch scaled_dot_product_attention with padding/window masks (local layers of long
  sequences attend chunk by chunk: `sliding_window.py`); the CPU default.
- flex: FlexAttention with block masks built once per forward from the layout
  (`block_masks.py`: from cu_seqlens directly for packed batches).
- varlen: torch.nn.attention.varlen.varlen_attn (torch >= 2.10, CUDA, bf16/fp16, unpadded;
  local layers need its `window_size`, torch >= 2.11).
- flash_attn: flash-attn 2's varlen kernels when the package imports here (unpadded,
  bf16/fp16).
- auto: the fastest one that runs for the tensors it is given.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from flexbert.attention.block_masks import packed_block_mask, padded_block_mask
from flexbert.attention.masks import block_diagonal_mask, padded_mask, zero_rows_without_keys
from flexbert.attention.sliding_window import (
    chunked_window_mask,
    chunked_window_sdpa,
    worth_chunking,
)
from flexbert.layout import Layout
from flexbert.registry import ComponentConfig, ConfigError, Registry

if TYPE_CHECKING:
    from flexbert.config import ModelConfig

log = logging.getLogger(__name__)

BACKENDS = Registry("attention backend")
AttentionFn = Callable[..., torch.Tensor]


@dataclass
class Backend:
    fn: AttentionFn
    check: Callable[[ModelConfig], None] = lambda cfg: None


def _no_dropout(name: str) -> Callable[[ModelConfig], None]:
    def check(cfg: ModelConfig) -> None:
        if cfg.attention_dropout > 0:
            raise ConfigError(
                f"backend: '{name}' has no attention-probability dropout; set "
                f"attention_dropout=0 or use backend 'sdpa' or 'eager'"
            )

    return check


# Backends that run unpadded tokens only: the padded layout (`padding='padded'`,
# `encode(keep_padding=True)`) is not theirs.
UNPADDED_ONLY = ("varlen", "flash_attn")


def runs_padded(cfg: ModelConfig) -> bool:
    """Whether the model's backend can run the padded (B, L) layout."""
    return cfg.backend.name not in UNPADDED_ONLY


def _unpadded_only(name: str) -> Callable[[ModelConfig], None]:
    def check(cfg: ModelConfig) -> None:
        if cfg.padding != "unpadded":
            raise ConfigError(
                f"backend: '{name}' runs on unpadded tokens; set padding='unpadded' or use "
                f"backend 'sdpa', 'flex' or 'eager' with padding='padded'"
            )

    return check


def _all(*checks: Callable[[ModelConfig], None]) -> Callable[[ModelConfig], None]:
    def check(cfg: ModelConfig) -> None:
        for c in checks:
            c(cfg)

    return check


# ---------------------------------------------------------------- eager (reference)
def eager_attention(q, k, v, layout: Layout, half, dropout_p: float, scale: float):
    if layout.padded:
        mask = layout.cached(("dense", half), lambda: padded_mask(layout, half))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    else:
        mask = layout.cached(("blockdiag", half), lambda: block_diagonal_mask(layout, half))
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    out = torch.matmul(probs, v)  # (B, H, L, D)
    if layout.padded:
        return zero_rows_without_keys(out.transpose(1, 2), layout, half)
    return out[0].transpose(0, 1)


# ---------------------------------------------------------------- sdpa
def _sdpa_padded(q, k, v, layout: Layout, half, dropout_p, scale):
    if half is not None and worth_chunking(q.shape[1], half):
        mask = layout.cached(
            ("chunked", half), lambda: chunked_window_mask(layout.attention_mask.bool(), half)
        )
        return chunked_window_sdpa(q, k, v, mask, half, dropout_p, scale)
    mask = layout.cached(("dense", half), lambda: padded_mask(layout, half))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)  # (B, L, H, D)


def sdpa_attention(q, k, v, layout: Layout, half, dropout_p: float, scale: float):
    if layout.padded:
        out = _sdpa_padded(q, k, v, layout, half, dropout_p, scale)
        return zero_rows_without_keys(out, layout, half)
    # Unpadded: attend row by row in a (B, max_seqlen) view, O(B L^2) rather than O(T^2).
    rows = layout.cached("rows_layout", lambda: _rows_layout(layout))
    if not layout.has_padding:  # equal lengths: the rows are a plain reshape
        shape = (layout.num_seqs, layout.max_seqlen, *q.shape[1:])
        out = _sdpa_padded(
            q.view(shape), k.view(shape), v.view(shape), rows, half, dropout_p, scale
        )
        return out.reshape(q.shape)
    index = layout.row_index()
    padded = []
    for t in (q, k, v):
        buf = t.new_zeros(layout.num_seqs * layout.max_seqlen, *t.shape[1:])
        buf.index_copy_(0, index, t)
        padded.append(buf.view(layout.num_seqs, layout.max_seqlen, *t.shape[1:]))
    out = _sdpa_padded(*padded, rows, half, dropout_p, scale)  # (B, Lmax, H, D)
    return out.reshape(-1, *out.shape[2:]).index_select(0, index)  # (T, H, D)


def _rows_layout(layout: Layout) -> Layout:
    """The padded (B, max_seqlen) view of an unpadded layout, for mask building."""
    lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]  # (B,)
    idx = torch.arange(layout.max_seqlen, device=lengths.device)
    mask = idx[None, :] < lengths[:, None]  # (B, max_seqlen)
    return Layout(True, layout.positions, attention_mask=mask, has_padding=layout.has_padding)


# ---------------------------------------------------------------- flex
def _flex_block_mask(layout: Layout, half):
    return padded_block_mask(layout, half) if layout.padded else packed_block_mask(layout, half)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Default dynamism: the first shape compiles static, a second one recompiles with symbolic
    # lengths, so packed batches of ever-new token counts do not recompile every time.
    return torch.compile(flex_attention)


def flex_attention_backend(q, k, v, layout: Layout, half, dropout_p: float, scale: float):
    from torch.nn.attention.flex_attention import flex_attention

    if not q.is_cuda and q.requires_grad:
        raise RuntimeError(
            "backend 'flex': FlexAttention has no backward pass on the CPU; train with "
            "backend 'sdpa' here (flex works on the CPU for inference and trains on CUDA)"
        )
    if q.is_cuda:  # uncompiled flex materialises the full score matrix
        flex_attention = _compiled_flex_attention()
    block_mask = layout.cached(("flex", half), lambda: _flex_block_mask(layout, half))
    if layout.padded:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale).transpose(1, 2)
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
    out = flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    return out[0].transpose(0, 1)  # (T, H, D)


# Kernels that take bf16/fp16 q, k, v only; fp32 gets a clear error before the kernel call.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_half(name: str, q: torch.Tensor) -> None:
    if q.dtype not in HALF_DTYPES:
        raise TypeError(
            f"backend '{name}' runs on bf16/fp16 q, k, v only, got {q.dtype}: cast the model "
            "(model.to(torch.bfloat16)) or run it under torch.autocast('cuda', "
            "dtype=torch.bfloat16), or use backend 'auto' (sdpa for fp32) or 'sdpa'"
        )


# ---------------------------------------------------------------- varlen (torch >= 2.10)
# Looked up once at import, so `auto` decides with plain constants inside compiled graphs.
_HAS_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _varlen_has_window() -> bool:
    """torch 2.10's varlen_attn has no `window_size` (it came in 2.11): global layers only."""
    if not _HAS_VARLEN:
        return False
    from torch.nn.attention.varlen import varlen_attn

    return "window_size" in inspect.signature(varlen_attn).parameters


_VARLEN_WINDOW = _varlen_has_window()


def varlen_available(local: bool = False) -> bool:
    """varlen_attn exists here; with `local`, it also takes a sliding window."""
    return _HAS_VARLEN and (_VARLEN_WINDOW or not local)


def _check_varlen(cfg: ModelConfig) -> None:
    if not varlen_available():
        raise ConfigError(
            f"backend: 'varlen' needs torch >= 2.10 (torch.nn.attention.varlen); this is torch "
            f"{torch.__version__}. Use backend 'sdpa'"
        )
    if "local" in cfg.layer_types and not varlen_available(local=True):
        raise ConfigError(
            f"backend: 'varlen' on torch {torch.__version__} has no sliding window "
            "(varlen_attn's window_size came in torch 2.11) and this model has local layers; "
            "use torch >= 2.11, backend 'flash_attn', 'flex' or 'sdpa', or a global pattern"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "backend: 'varlen' runs on CUDA only and no GPU is visible; use backend 'sdpa' "
            "(or 'auto', which picks varlen whenever the tensors are on a GPU)"
        )


def varlen_attention(q, k, v, layout: Layout, half, dropout_p: float, scale: float):
    _check_half("varlen", q)
    from torch.nn.attention.varlen import varlen_attn

    # Keyword arguments only where they differ from the defaults, so torch releases whose
    # varlen_attn lacks one of them still run the common case.
    kwargs = {} if half is None else {"window_size": (half, half)}
    if scale != q.shape[-1] ** -0.5:
        kwargs["scale"] = scale
    cu, m = layout.cu_seqlens, layout.max_seqlen
    # v is a strided view of the fused qkv projection; q and k are fresh after RoPE.
    return varlen_attn(q, k, v.contiguous(), cu, cu, m, m, **kwargs)


# ---------------------------------------------------------------- flash-attn package
# A real import, tried once (None: not yet) and at build time, so `auto` reads a plain
# constant inside compiled graphs: a flash-attn built for another torch is installed (it has
# a module spec) but fails to import (undefined symbol), and counts as missing.
_HAS_FLASH_ATTN: bool | None = None
_FLASH_ATTN_ERROR = ""  # why it does not import, for the refusal's message


def flash_attn_available() -> bool:
    global _HAS_FLASH_ATTN, _FLASH_ATTN_ERROR
    if _HAS_FLASH_ATTN is None:
        try:
            from flash_attn import flash_attn_varlen_func  # noqa: F401

            _HAS_FLASH_ATTN = True
        except Exception as err:  # missing, or built for another torch / CUDA
            _FLASH_ATTN_ERROR = f"{type(err).__name__}: {err}"
            log.debug("flash-attn is not usable here: %s", _FLASH_ATTN_ERROR)
            _HAS_FLASH_ATTN = False
    return _HAS_FLASH_ATTN


def _check_flash(cfg: ModelConfig) -> None:
    if not flash_attn_available():
        why = f" (here: {_FLASH_ATTN_ERROR})" if _FLASH_ATTN_ERROR else ""
        raise ConfigError(
            "backend: 'flash_attn' needs the flash-attn package, built for this torch "
            f"(pip install flexbert[flash]){why}; use backend 'varlen' (CUDA, torch >= 2.11) "
            "or 'sdpa'"
        )


def _check_auto(cfg: ModelConfig) -> None:
    if torch.cuda.is_available():  # where auto may pick flash_attn: try the import now
        flash_attn_available()


def flash_attention(q, k, v, layout: Layout, half, dropout_p: float, scale: float):
    _check_half("flash_attn", q)
    from flash_attn import flash_attn_varlen_func

    window = (-1, -1) if half is None else (half, half)
    cu, m = layout.cu_seqlens, layout.max_seqlen
    return flash_attn_varlen_func(
        q, k, v, cu, cu, m, m, dropout_p=dropout_p, softmax_scale=scale, window_size=window
    )


# ---------------------------------------------------------------- auto
def resolve_auto(
    q: torch.Tensor, layout: Layout, dropout_p: float, local: bool = False
) -> AttentionFn:
    """Fastest backend for these tensors (`local`: a sliding-window layer): varlen/flash_attn
    on GPU when unpadded, else sdpa."""
    fast_ok = q.is_cuda and not layout.padded and q.dtype in HALF_DTYPES
    if fast_ok and dropout_p == 0 and varlen_available(local):
        return varlen_attention
    if fast_ok and flash_attn_available():
        return flash_attention
    return sdpa_attention


def auto_attention(q, k, v, layout: Layout, half, dropout_p: float, scale: float):
    fn = resolve_auto(q, layout, dropout_p, local=half is not None)
    return fn(q, k, v, layout, half, dropout_p, scale)


_REGISTERED = {
    "eager": Backend(eager_attention),
    "sdpa": Backend(sdpa_attention),
    "flex": Backend(flex_attention_backend, _no_dropout("flex")),
    "varlen": Backend(
        varlen_attention, _all(_unpadded_only("varlen"), _no_dropout("varlen"), _check_varlen)
    ),
    "flash_attn": Backend(flash_attention, _all(_unpadded_only("flash_attn"), _check_flash)),
    "auto": Backend(auto_attention, _check_auto),
}
for _name, _backend in _REGISTERED.items():
    BACKENDS.register(_name, ComponentConfig)(lambda cfg, _b=_backend: _b)
