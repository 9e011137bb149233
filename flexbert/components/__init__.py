"""Registered model components, one module per ablation axis."""

from flexbert.components.activation import ACTIVATIONS
from flexbert.components.attention_pattern import ATTENTION_PATTERNS
from flexbert.components.init import INITS
from flexbert.components.mlp import MLPS
from flexbert.components.norm import NORMS
from flexbert.components.pooling import POOLINGS
from flexbert.components.position import POSITIONS

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_PATTERNS",
    "INITS",
    "MLPS",
    "NORMS",
    "POOLINGS",
    "POSITIONS",
]
