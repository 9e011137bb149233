"""Optimizers from the Hydra `optimizer` node (`_target_` + `_partial_`), with ModernBERT's
weight-decay filter: biases and norm weights are not decayed (`no_decay` name fragments).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

NO_DECAY_KEY = "no_decay"


def param_groups(model: nn.Module, no_decay: Iterable[str] = ("bias", "norm")) -> list[dict]:
    """Two groups: decayed weights, and parameters whose name contains a `no_decay` fragment."""
    fragments = tuple(no_decay)
    decay, plain = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (plain if any(f in name for f in fragments) else decay).append(p)
    groups = [{"params": decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def build_optimizer(
    node: DictConfig | Mapping[str, Any], model: nn.Module, device: str = "cpu"
) -> torch.optim.Optimizer:
    """Instantiate the optimizer node (`_target_`, `_partial_: true`) over `model`'s groups.

    On the CPU, torch-optimi's Triton path is switched off: optimi 0.3 picks Triton whenever it
    is installed (its device check runs on an empty list) and then fails without a GPU.
    """
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    values = dict(values)  # type: ignore[arg-type]
    no_decay = values.pop(NO_DECAY_KEY, None) or ()
    if device == "cpu" and str(values.get("_target_", "")).startswith("optimi."):
        values.setdefault("triton", False)
    factory = instantiate(values, _partial_=True, _convert_="all")
    return factory(param_groups(model, no_decay))
