"""Positional schemes: `rope` (separate global/local theta), learned `absolute`, or `none`.

Each builds a module with two hooks the model calls: `embed` (added to token embeddings) and
`rotary` (cos/sin per layer type, applied to q and k inside attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from flexbert.registry import ComponentConfig, ConfigError, Registry

if TYPE_CHECKING:
    from flexbert.config import ModelConfig

POSITIONS = Registry("position")
Rotary = dict[str, tuple[torch.Tensor, torch.Tensor, bool]]  # layer type -> (cos, sin, fp32)


@dataclass
class RopeConfig(ComponentConfig):
    global_theta: float = 160_000.0
    local_theta: float = 10_000.0
    # Rotate q and k in fp32, as Hugging Face ModernBERT does (identical outputs); false keeps
    # the activations' dtype (bf16 under autocast: half the memory traffic, ~1e-2 differences).
    fp32: bool = True

    def validate(self) -> None:
        for key in ("global_theta", "local_theta"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")


class NoPosition(nn.Module):
    def embed(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return hidden

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Rotary | None:
        return None


class AbsolutePosition(NoPosition):
    """Learned position embeddings added to the token embeddings (BERT)."""

    def __init__(self, max_seq_len: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def embed(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return hidden + self.weight[position_ids]


class RotaryPosition(NoPosition):
    """RoPE with one theta per layer type; positions restart at every sequence."""

    def __init__(self, head_dim: int, thetas: dict[str, float], fp32: bool = True) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.thetas = thetas
        self.fp32 = fp32

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Rotary:
        out = {}
        dim = self.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float, device=position_ids.device) / dim
        for layer_type, theta in self.thetas.items():
            inv_freq = 1.0 / (theta**exponents)  # (D/2,)
            freqs = position_ids[..., None].float() * inv_freq  # (..., D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (..., D)
            sin = emb.sin().to(dtype)
            # rotate_half(x) * sin == roll(x, D/2) * [-sin_1, sin_2]: fold the sign into sin once
            # per forward instead of negating q and k in every layer (bit-identical results).
            signed_sin = torch.cat((-sin[..., : dim // 2], sin[..., dim // 2 :]), dim=-1)
            out[layer_type] = (emb.cos().to(dtype), signed_sin, self.fp32)
        return out


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    fp32: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (..., H, D); cos, signed_sin: (..., D) from `RotaryPosition.rotary`.

    x * cos + rotate_half(x) * sin, in fp32 like Hugging Face ModernBERT unless `fp32` is
    false (then in q's dtype)."""
    cos, sin = cos.unsqueeze(-2), signed_sin.unsqueeze(-2)  # (..., 1, D)
    compute = torch.float32 if fp32 else q.dtype
    cos, sin = cos.to(compute), sin.to(compute)
    half = q.shape[-1] // 2
    qc, kc = q.to(compute), k.to(compute)
    q_out = qc * cos + qc.roll(half, dims=-1) * sin
    k_out = kc * cos + kc.roll(half, dims=-1) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


@POSITIONS.register("rope", RopeConfig)
def build_rope(cfg: RopeConfig, model_cfg: ModelConfig) -> nn.Module:
    thetas = {"global": cfg.global_theta, "local": cfg.local_theta}
    used = {t: thetas[t] for t in sorted(set(model_cfg.layer_types))}
    return RotaryPosition(model_cfg.head_dim, used, cfg.fp32)


@POSITIONS.register("absolute")
def build_absolute(cfg: ComponentConfig, model_cfg: ModelConfig) -> nn.Module:
    return AbsolutePosition(model_cfg.max_seq_len, model_cfg.hidden_size)


@POSITIONS.register("none")
def build_none(cfg: ComponentConfig, model_cfg: ModelConfig) -> nn.Module:
    return NoPosition()
