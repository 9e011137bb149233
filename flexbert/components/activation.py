"""Activation functions used by the MLP and the prediction head."""

from __future__ import annotations

import torch
from torch import nn

from flexbert.registry import ComponentConfig, Registry

ACTIVATIONS = Registry("activation")


class ReLUSquared(nn.Module):
    """relu(x)^2 (Primer); cheap and competitive in GLU-free MLPs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


@ACTIVATIONS.register("gelu")
def build_gelu(cfg: ComponentConfig) -> nn.Module:
    return nn.GELU()


@ACTIVATIONS.register("gelu_tanh")
def build_gelu_tanh(cfg: ComponentConfig) -> nn.Module:
    return nn.GELU(approximate="tanh")


@ACTIVATIONS.register("silu")
def build_silu(cfg: ComponentConfig) -> nn.Module:
    return nn.SiLU()


@ACTIVATIONS.register("relu")
def build_relu(cfg: ComponentConfig) -> nn.Module:
    return nn.ReLU()


@ACTIVATIONS.register("relu2")
def build_relu2(cfg: ComponentConfig) -> nn.Module:
    return ReLUSquared()
