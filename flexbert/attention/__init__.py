"""Attention: one module, many backends."""

from flexbert.attention.attention import Attention
from flexbert.attention.backends import BACKENDS

__all__ = ["BACKENDS", "Attention"]
