"""Which layers attend globally and which through a sliding window.

A pattern resolves to `layer_types` (one "global"/"local" per layer) and a window: the total
width of the local band, so a local token attends to keys with |i - j| <= window // 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexbert.registry import ComponentConfig, ConfigError, Registry

ATTENTION_PATTERNS = Registry("attention_pattern")
LAYER_TYPES = ("global", "local")


def _check_window(window: int) -> None:
    if window < 2 or window % 2:
        raise ConfigError(f"window must be an even integer >= 2, got {window}")


@dataclass
class GlobalPatternConfig(ComponentConfig):
    def layer_types(self, num_layers: int) -> list[str]:
        return ["global"] * num_layers

    @property
    def window(self) -> int | None:
        return None


@dataclass
class LocalGlobalPatternConfig(ComponentConfig):
    """Every `global_every`-th layer (starting at layer 0) is global, the rest local."""

    window: int = 128
    global_every: int = 3

    def validate(self) -> None:
        _check_window(self.window)
        if self.global_every < 1:
            raise ConfigError(f"global_every must be >= 1, got {self.global_every}")

    def layer_types(self, num_layers: int) -> list[str]:
        return ["global" if i % self.global_every == 0 else "local" for i in range(num_layers)]


@dataclass
class ExplicitPatternConfig(ComponentConfig):
    """A list with one "global" or "local" per layer."""

    types: list[str] = field(default_factory=list)
    window: int = 128

    def validate(self) -> None:
        _check_window(self.window)
        bad = [t for t in self.types if t not in LAYER_TYPES]
        if bad or not self.types:
            raise ConfigError(
                f"types must be a non-empty list of {list(LAYER_TYPES)}, got {self.types}"
            )

    def layer_types(self, num_layers: int) -> list[str]:
        if len(self.types) != num_layers:
            raise ConfigError(
                f"types lists {len(self.types)} layers but num_layers is {num_layers}"
            )
        return list(self.types)


ATTENTION_PATTERNS.register("global", GlobalPatternConfig)(lambda cfg: cfg)
ATTENTION_PATTERNS.register("local_global", LocalGlobalPatternConfig)(lambda cfg: cfg)
ATTENTION_PATTERNS.register("explicit", ExplicitPatternConfig)(lambda cfg: cfg)
