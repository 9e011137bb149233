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
Rotary = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RopeConfig(ComponentConfig):
    global_theta: float = 160_000.0
    local_theta: float = 10_000.0

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

    def __init__(self, head_dim: int, thetas: dict[str, float]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.thetas = thetas

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Rotary:
        out = {}
        dim = self.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float, device=position_ids.device) / dim
        for layer_type, theta in self.thetas.items():
            inv_freq = 1.0 / (theta**exponents)  # (D/2,)
            freqs = position_ids[..., None].float() * inv_freq  # (..., D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (..., D)
            out[layer_type] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (..., H, D); cos, sin: (..., D). Computed in fp32 like Hugging Face ModernBERT."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()  # (..., 1, D)
    q32, k32 = q.float(), k.float()
    q_out = q32 * cos + rotate_half(q32) * sin
    k_out = k32 * cos + rotate_half(k32) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


@POSITIONS.register("rope", RopeConfig)
def build_rope(cfg: RopeConfig, model_cfg: ModelConfig) -> nn.Module:
    thetas = {"global": cfg.global_theta, "local": cfg.local_theta}
    used = {t: thetas[t] for t in sorted(set(model_cfg.layer_types))}
    return RotaryPosition(model_cfg.head_dim, used)


@POSITIONS.register("absolute")
def build_absolute(cfg: ComponentConfig, model_cfg: ModelConfig) -> nn.Module:
    return AbsolutePosition(model_cfg.max_seq_len, model_cfg.hidden_size)


@POSITIONS.register("none")
def build_none(cfg: ComponentConfig, model_cfg: ModelConfig) -> nn.Module:
    return NoPosition()
