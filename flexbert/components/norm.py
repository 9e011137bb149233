"""Normalisation layers: `layernorm` (optional bias) and `rmsnorm`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flexbert.registry import ComponentConfig, ConfigError, Registry

NORMS = Registry("norm")


@dataclass
class LayerNormConfig(ComponentConfig):
    eps: float = 1e-5
    bias: bool = False

    def validate(self) -> None:
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")


@dataclass
class RMSNormConfig(ComponentConfig):
    eps: float = 1e-5

    def validate(self) -> None:
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")


@NORMS.register("layernorm", LayerNormConfig)
def build_layernorm(cfg: LayerNormConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.eps, bias=cfg.bias)


@NORMS.register("rmsnorm", RMSNormConfig)
def build_rmsnorm(cfg: RMSNormConfig, dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=cfg.eps)
