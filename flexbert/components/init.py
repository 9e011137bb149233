"""Weight initialisation schemes.

`hf_trunc_normal` matches Hugging Face ModernBERT: truncated normal with std 0.02 cut at
`cutoff_factor` std, output projections scaled by 1/sqrt(2 * num_layers), classifiers by
hidden_size ** -0.5. `megatron` is the code that trained the paper's models (`full_megatron`):
the same, except that the MLM prediction head's dense layer counts as an input projection
(std, where Hugging Face gives it std / sqrt(2 * num_layers)); the ModernBERT recipes use it.
`normal` is plain BERT-style N(0, std). Roles come from module names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from flexbert.registry import ComponentConfig, ConfigError, Registry

if TYPE_CHECKING:
    from flexbert.config import ModelConfig

INITS = Registry("init")

# Last component of a Linear's name -> which std it gets.
LINEAR_ROLES = {"Wqkv": "in", "Wi": "in", "Wo": "out", "dense": "out", "classifier": "final_out"}


@dataclass
class TruncNormalInitConfig(ComponentConfig):
    std: float = 0.02
    cutoff_factor: float = 2.0

    def validate(self) -> None:
        if not (self.std > 0 and self.cutoff_factor > 0):
            raise ConfigError("std and cutoff_factor must be > 0")


@dataclass
class NormalInitConfig(ComponentConfig):
    std: float = 0.02

    def validate(self) -> None:
        if not self.std > 0:
            raise ConfigError(f"std must be > 0, got {self.std}")


def _stds(std: float, model_cfg: ModelConfig) -> dict[str, float]:
    return {
        "in": std,
        "out": std / math.sqrt(2.0 * model_cfg.num_layers),
        "embedding": std,
        "final_out": model_cfg.hidden_size**-0.5,
    }


def _initialize(
    model: nn.Module, model_cfg: ModelConfig, std: float, init_fn, mlm_head_role: str = "out"
) -> None:
    stds = _stds(std, model_cfg)
    seen: set[int] = set()
    is_mlm = hasattr(model, "decoder")
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding):
            init_fn(module.weight, stds["embedding"])
        elif isinstance(module, nn.Linear):
            if id(module.weight) in seen:  # a decoder tied to the embedding
                continue
            role = (
                mlm_head_role if is_mlm and name == "head.dense" else LINEAR_ROLES.get(leaf, "in")
            )
            init_fn(module.weight, stds[role])
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        for p in module.parameters(recurse=False):
            seen.add(id(p))
    decoder = getattr(model, "decoder", None)
    if isinstance(decoder, nn.Linear) and decoder.bias is not None:
        nn.init.zeros_(decoder.bias)


@INITS.register("hf_trunc_normal", TruncNormalInitConfig)
def init_trunc_normal(cfg: TruncNormalInitConfig, model: nn.Module, model_cfg: ModelConfig) -> None:
    def fn(w, s):
        nn.init.trunc_normal_(w, 0.0, s, -cfg.cutoff_factor * s, cfg.cutoff_factor * s)

    _initialize(model, model_cfg, cfg.std, fn)


@INITS.register("megatron", TruncNormalInitConfig)
def init_megatron(cfg: TruncNormalInitConfig, model: nn.Module, model_cfg: ModelConfig) -> None:
    def fn(w, s):
        nn.init.trunc_normal_(w, 0.0, s, -cfg.cutoff_factor * s, cfg.cutoff_factor * s)

    _initialize(model, model_cfg, cfg.std, fn, mlm_head_role="in")


@INITS.register("normal", NormalInitConfig)
def init_normal(cfg: NormalInitConfig, model: nn.Module, model_cfg: ModelConfig) -> None:
    _initialize(model, model_cfg, cfg.std, lambda w, s: nn.init.normal_(w, 0.0, s))
