"""Feed-forward blocks: plain `mlp` (Wi -> act -> Wo) and gated `glu` (GeGLU with gelu)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from flexbert.registry import ComponentConfig, Registry

if TYPE_CHECKING:
    from flexbert.config import ModelConfig

MLPS = Registry("mlp")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.Wi = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_in_bias)
        self.act = cfg.build_activation(cfg.activation)
        self.drop = nn.Dropout(cfg.mlp_dropout)
        self.Wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Wo(self.drop(self.act(self.Wi(x))))


class GLU(nn.Module):
    """Gated MLP: Wi projects to 2 x intermediate, split into (input, gate)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.Wi = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_in_bias)
        self.act = cfg.build_activation(cfg.activation)
        self.drop = nn.Dropout(cfg.mlp_dropout)
        self.Wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, gate = self.Wi(x).chunk(2, dim=-1)  # (..., I) each
        return self.Wo(self.drop(self.act(inp) * gate))


@MLPS.register("mlp")
def build_mlp(cfg: ComponentConfig, model_cfg: ModelConfig) -> nn.Module:
    return MLP(model_cfg)


@MLPS.register("glu")
def build_glu(cfg: ComponentConfig, model_cfg: ModelConfig) -> nn.Module:
    return GLU(model_cfg)
