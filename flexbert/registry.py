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


# Field annotations (strings under `from __future__ import annotations`) whose values are
# checked: what each admits and how to name it. Others (Any, lists, unions) check themselves.
_SIMPLE_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": (
        "a number",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    ),
    "str": ("a string", lambda v: isinstance(v, str)),
}


def check_field_types(obj: Any, prefix: str = "") -> None:
    """Refuse a dataclass field whose value is not of its annotated simple type (bool, int,
    float, str, or one of them | None): a string "false" is truthy, a 128.0 window or a "1e-5"
    eps from a YAML loader would fail deep inside the model instead."""
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        kind = str(f.type).replace(" ", "")
        optional = kind.endswith("|None")
        kind = kind.removesuffix("|None")
        if kind not in _SIMPLE_TYPES:
            continue
        value = getattr(obj, f.name)
        if value is None and optional:
            continue
        what, ok = _SIMPLE_TYPES[kind]
        if not ok(value):
            null = " (or null)" if optional else ""
            hint = ""
            if kind == "float" and isinstance(value, str) and _is_number(value):
                hint = " (a string: PyYAML reads 1e-5 as one; write 1.0e-5)"
            elif isinstance(value, str) and _is_number(value):
                hint = " (a string: write it without quotes)"
            raise ConfigError(f"{prefix}{f.name} must be {what}{null}, got {value!r}{hint}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
            check_field_types(cfg)
            cfg.validate()
        except ConfigError as err:
            raise ConfigError(f"{field}: {err}") from None
        return cfg

    def build(self, cfg: ComponentConfig, *args: Any, **kwargs: Any) -> Any:
        return self._entry(cfg.name, self.axis).builder(cfg, *args, **kwargs)
