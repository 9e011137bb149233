"""`ModelConfig`: the one source of truth for a FlexBERT model.

Sizes, special ids and per-axis component choices (each a small dataclass from its registry)
live here; `layer_types` is derived from the attention pattern. Everything is validated once,
at construction, with messages that name the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from flexbert.attention.backends import BACKENDS
from flexbert.components import (
    ACTIVATIONS,
    ATTENTION_PATTERNS,
    INITS,
    MLPS,
    NORMS,
    POOLINGS,
    POSITIONS,
)
from flexbert.registry import ComponentConfig, ConfigError, Registry, check_field_types

PADDINGS = ("unpadded", "padded")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")

# ModelConfig field -> the registry its value is validated against.
COMPONENT_FIELDS: dict[str, Registry] = {
    "norm": NORMS,
    "activation": ACTIVATIONS,
    "head_activation": ACTIVATIONS,
    "mlp": MLPS,
    "attention_pattern": ATTENTION_PATTERNS,
    "position": POSITIONS,
    "backend": BACKENDS,
    "init": INITS,
    "pooling": POOLINGS,
}

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: small enough for the CPU, window shorter than typical test sequences.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        intermediate_size=96,
        max_seq_len=512,
        attention_pattern={"name": "local_global", "window": 16, "global_every": 3},
        pad_token_id=0,
        cls_token_id=1,
        sep_token_id=2,
        mask_token_id=3,
    ),
    "base": dict(hidden_size=768, num_layers=22, num_heads=12, intermediate_size=1152),
    "large": dict(hidden_size=1024, num_layers=28, num_heads=16, intermediate_size=2624),
}


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 50368
    hidden_size: int = 768
    num_layers: int = 22
    num_heads: int = 12
    intermediate_size: int = 1152
    max_seq_len: int = 8192
    # special token ids (ModernBERT tokenizer)
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    mask_token_id: int = 50284
    # components (a registered name, a {"name": ..., **options} mapping, or a config object)
    norm: Any = "layernorm"
    activation: Any = "gelu"
    mlp: Any = "glu"
    attention_pattern: Any = "local_global"
    position: Any = "rope"
    backend: Any = "auto"
    init: Any = "hf_trunc_normal"
    pooling: Any = "cls"
    head_activation: Any = "gelu"
    # layout
    padding: str = "unpadded"
    # biases and structural toggles
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_in_bias: bool = False
    mlp_out_bias: bool = False
    head_bias: bool = False  # the prediction head's dense layer
    decoder_bias: bool = True
    embedding_norm: bool = True
    skip_first_prenorm: bool = True  # layer 0 has no attention pre-norm (embedding norm does it)
    final_norm: bool = True
    # dropout
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    # on the attention output projection; None: attention_dropout (Hugging Face ModernBERT's
    # one knob for both). ModernBERT pretrained with 0.1 here and 0.0 on the probabilities.
    attention_out_dropout: float | None = None
    mlp_dropout: float = 0.0
    head_dropout: float = 0.0  # before the classifier of task heads
    # heads
    sparse_prediction: bool = False  # MLM: decode only positions that carry a label
    num_labels: int = 2
    problem_type: str | None = None
    label_names: list[str] | None = None  # one per label (Hugging Face's id2label), if named
    # derived
    layer_types: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name, registry in COMPONENT_FIELDS.items():
            setattr(self, name, registry.config(getattr(self, name), field=name))
        self._validate()
        self.layer_types = self.attention_pattern.layer_types(self.num_layers)

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """`tiny` | `base` | `large`, with keyword overrides of any field."""
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown preset '{name}'; valid presets are {list(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a plain mapping (YAML, a checkpoint); unknown keys are an error."""
        allowed = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - allowed)
        if unknown:
            hints = [
                f"'{key}': did you mean '{close[0]}'?"
                for key in unknown
                if (close := difflib.get_close_matches(key, allowed, n=1))
            ]
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise ConfigError(
                f"unknown ModelConfig key(s) {unknown}{hint}; valid keys are {sorted(allowed)}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(value) if isinstance(value, ComponentConfig) else value
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes`; another num_labels drops label names that no longer fit."""
        if changes.get("num_labels", self.num_labels) != self.num_labels:
            changes.setdefault("label_names", None)
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def build_norm(self) -> nn.Module:
        return NORMS.build(self.norm, self.hidden_size)

    def build_activation(self, cfg: ComponentConfig) -> nn.Module:
        return ACTIVATIONS.build(cfg)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        check_field_types(self)
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_seq_len",
            "num_labels",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 2 and self.position.name == "rope":
            raise ConfigError(
                f"rope needs an even head dim; hidden_size/num_heads = {self.head_dim}"
            )
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"{name} must be an integer in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        for name in (
            "embedding_dropout",
            "attention_dropout",
            "attention_out_dropout",
            "mlp_dropout",
            "head_dropout",
        ):
            value = getattr(self, name)
            if value is None and name == "attention_out_dropout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.padding not in PADDINGS:
            raise ConfigError(
                f"padding: unknown padding '{self.padding}'; valid choices are {list(PADDINGS)}"
            )
        names = self.label_names
        if names is not None and (
            isinstance(names, str)
            or len(names) != self.num_labels
            or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)
        ):
            raise ConfigError(
                f"label_names: {self.num_labels} distinct names (one per label, num_labels="
                f"{self.num_labels}) or None, got {names!r}"
            )
        if self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(
                f"problem_type must be one of {list(PROBLEM_TYPES)}, got {self.problem_type!r}"
            )
        self.attention_pattern.layer_types(self.num_layers)  # explicit lists must match num_layers
