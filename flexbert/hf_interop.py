"""`from_hf` / `save_hf` on every model class, delegating to `flexbert.hf`.

Kept as a thin mixin so the model core imports torch only; transformers is imported lazily by
`flexbert.hf` when one of these methods is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class HFInteropMixin:
    @classmethod
    def from_hf(cls, path: str | Path, **overrides: Any):
        """Load a Hugging Face ModernBERT directory (config.json + safetensors or bin), or a
        Hub id such as "answerdotai/ModernBERT-base" (downloaded into the Hugging Face cache)."""
        from flexbert import hf

        return hf.load_hf(cls, path, **overrides)

    def save_hf(self, path: str | Path) -> Path:
        """Write a directory that transformers' Auto classes load with identical outputs."""
        from flexbert import hf

        return hf.save_hf(self, path)
