"""Typed registries: one per ablation axis, each a name -> (config dataclass, builder) map.

A builder is registered with the dataclass that configures it::

    @NORMS.register("rmsnorm", RMSNormConfig)
    def build_rmsnorm(cfg: RMSNormConfig, dim: int) -> nn.Module: ...

`Registry.config` turns a name, a mapping (from YAML/Hydra) or a config instance into the
validated dataclass, so a typo in a key fails with the key's name and the valid ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A model or component configuration that cannot be built."""


@dataclass
class ComponentConfig:
    """Base of every component's config; `name` is the registered name it builds."""

    name: str = ""

    def validate(self) -> None:
        """Check field values; raise ConfigError naming the field. Override where needed."""


@dataclass(frozen=True)
class _Entry:
    config_cls: type[ComponentConfig]
    builder: Callable[..., Any]


class Registry:
    """Name -> (config dataclass, builder) for one axis of the model (norm, mlp, ...)."""

    def __init__(self, axis: str) -> None:
        self.axis = axis
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, config_cls: type[ComponentConfig] = ComponentConfig):
        """Decorator registering `builder(cfg, *args)` under `name`."""

        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ConfigError(f"{self.axis} '{name}' is already registered")
            self._entries[name] = _Entry(config_cls, builder)
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str, field: str) -> _Entry:
        if name not in self._entries:
            raise ConfigError(
                f"{field}: unknown {self.axis} '{name}'; valid choices are {self.names()}"
            )
        return self._entries[name]

    def config(
        self, value: str | Mapping[str, Any] | ComponentConfig, field: str = ""
    ) -> ComponentConfig:
        """Coerce `value` into this axis's validated config dataclass."""
        field = field or self.axis
        if isinstance(value, ComponentConfig):
            entry = self._entry(value.name, field)
            if not isinstance(value, entry.config_cls):
                raise ConfigError(
                    f"{field}: {type(value).__name__} does not configure {self.axis} '{value.name}'"
                    f" (expected {entry.config_cls.__name__})"
                )
            cfg = value
        elif isinstance(value, str):
            cfg = self._entry(value, field).config_cls(name=value)
        elif isinstance(value, Mapping):
            values = dict(value)
            if "name" not in values:
                raise ConfigError(
                    f"{field}: a mapping needs a 'name' key; valid names are {self.names()}"
                )
            entry = self._entry(values["name"], field)
            allowed = {f.name for f in dataclasses.fields(entry.config_cls) if f.init}
            unknown = sorted(set(values) - allowed)
            if unknown:
                raise ConfigError(
                    f"{field}: unknown key(s) {unknown} for {self.axis} '{values['name']}'; "
                    f"valid keys are {sorted(allowed)}"
                )
            cfg = entry.config_cls(**values)
        else:
            raise ConfigError(
                f"{field}: expected a name, a mapping or a config, got {type(value).__name__}"
            )
        try:
            cfg.validate()
        except ConfigError as err:
            raise ConfigError(f"{field}: {err}") from None
        return cfg

    def build(self, cfg: ComponentConfig, *args: Any, **kwargs: Any) -> Any:
        return self._entry(cfg.name, self.axis).builder(cfg, *args, **kwargs)
