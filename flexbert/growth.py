"""Growing a larger model from a smaller trained one (ModernBERT-large started from -base).

Every weight of the target is filled from the matching weight of the source, dimension by
dimension, by one of three tilings (`TILE_MODES`):

- `middle` (the default): the source is repeated, wrapping, aligned so that one whole copy
  sits in the middle: `new[i] = old[(i - (n_new - n_old) // 2) % n_old]`. This is how
  ModernBERT-large grew from -base ("center tiling" with the rest filled by wraparound: the
  reference code's `tile_weights_from_middle`).
- `center`: the source block sits in the middle of the target tensor; the rest keeps the
  target's fresh initialisation.
- `edge`: the source is repeated from index 0 on, wrapping: `new[i] = old[i % n_old]`.

Fused projections are tiled per part: the query/key/value thirds of `Wqkv` and the input/gate
halves of a GLU's `Wi`, so every part of the grown tensor comes from the same part of the
source. Depth grows by a layer map (`LAYER_MAPS`): `gopher` stretches the source stack in
order (target layer i <- source layer round(i * n_source / n_target), as the ModernBERT
reference code does; each source layer repeated in place, as in Gopher's depth expansion),
`cyclic` repeats the whole stack.

When the model grows, the encoder's final norm keeps its fresh initialisation, as in the
reference code (it tiles the embedding norm and every layer's norms, not the final one).
With equal sizes every tiling is a plain copy, so growth also loads a same-size checkpoint
(final norm included). Growth never shrinks a dimension and never changes the vocabulary;
both are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from flexbert.attention import Attention
from flexbert.components.mlp import GLU
from flexbert.model import FlexBertModel
from flexbert.registry import ConfigError

TILE_MODES = ("center", "edge", "middle")
LAYER_MAPS = ("gopher", "cyclic")
ENCODER = "model."  # every encoder parameter name, normalised, starts with this
FRESH_WHEN_GROWN = ENCODER + "final_norm."  # left at its init when the model grows


@dataclass
class GrowthReport:
    """What growth did: target name -> source name, and what it could not fill or use."""

    copied: dict[str, str] = field(default_factory=dict)
    kept_init: list[str] = field(default_factory=list)  # target weights with no source
    dropped: list[str] = field(default_factory=list)  # source head weights the target lacks
    layer_map: list[int] = field(default_factory=list)  # target layer -> source layer


def layer_mapping(n_source: int, n_target: int, scheme: str = "gopher") -> list[int]:
    """For each target layer, the source layer it starts from."""
    if scheme not in LAYER_MAPS:
        raise ConfigError(f"layer_map must be one of {LAYER_MAPS}, got {scheme!r}")
    if n_target < n_source:
        raise ConfigError(f"cannot grow {n_source} layers into fewer ({n_target})")
    if scheme == "gopher":
        return [min(round(i * n_source / n_target), n_source - 1) for i in range(n_target)]
    return [i % n_source for i in range(n_target)]


def _tile_index(n_old: int, n_new: int, mode: str) -> torch.Tensor | None:
    """Source index for each target index along one dimension; None for `center` (a slice)."""
    if mode == "center":
        return None
    offset = 0 if mode == "edge" else (n_new - n_old) // 2
    return (torch.arange(n_new) - offset) % n_old


def tile_tensor(source: torch.Tensor, target: torch.Tensor, mode: str = "middle") -> torch.Tensor:
    """`target`'s shape filled from `source` by `mode`; `target`'s values stay where `center`
    leaves room. Dimensions of equal size are copied straight."""
    if mode not in TILE_MODES:
        raise ConfigError(f"tile_mode must be one of {TILE_MODES}, got {mode!r}")
    if source.dim() != target.dim() or any(
        a > b for a, b in zip(source.shape, target.shape, strict=True)
    ):
        raise ConfigError(
            f"cannot tile a {tuple(source.shape)} tensor into {tuple(target.shape)}: "
            "growth needs the same rank and no dimension smaller than the source's"
        )
    out = target.detach().clone()
    src = source.detach().to(dtype=out.dtype, device=out.device)
    if mode == "center":
        region = tuple(
            slice((b - a) // 2, (b - a) // 2 + a) for a, b in zip(src.shape, out.shape, strict=True)
        )
        out[region] = src
        return out
    for dim, (a, b) in enumerate(zip(src.shape, out.shape, strict=True)):
        index = _tile_index(a, b, mode)
        src = src.index_select(dim, index.to(src.device))  # type: ignore[union-attr]
    return src.contiguous()


def _tile_fused(source: torch.Tensor, target: torch.Tensor, parts: int, mode: str) -> torch.Tensor:
    """Tile each of `parts` equal slices along dim 0 separately (q/k/v, input/gate)."""
    if source.shape[0] % parts or target.shape[0] % parts:
        raise ConfigError(
            f"fused weight of shape {tuple(source.shape)} -> {tuple(target.shape)} "
            f"does not split into {parts} parts"
        )
    pieces = [
        tile_tensor(s, t, mode)
        for s, t in zip(source.chunk(parts), target.chunk(parts), strict=True)
    ]
    return torch.cat(pieces)


# Modules whose projection packs several equal parts along dim 0: (class, Linear, parts).
FUSED_PROJECTIONS = ((Attention, "Wqkv", 3), (GLU, "Wi", 2))  # q/k/v; input/gate


def _fused_parts(model: nn.Module) -> dict[str, int]:
    """Normalised parameter name -> how many fused parts it holds along dim 0."""
    parts: dict[str, int] = {}
    for name, module in model.named_modules():
        for cls, leaf, count in FUSED_PROJECTIONS:
            if isinstance(module, cls):
                for pname, _ in getattr(module, leaf).named_parameters():
                    parts[_normalise(model, f"{name}.{leaf}.{pname}")] = count
    return parts


def _normalise(model: nn.Module, name: str) -> str:
    """Encoder names start with `model.` whether `model` is the encoder or a task model."""
    return ENCODER + name if isinstance(model, FlexBertModel) else name


def _named(model: nn.Module) -> dict[str, nn.Parameter]:
    return {_normalise(model, n): p for n, p in model.named_parameters()}


def _source_name(target_name: str, layer_map: list[int]) -> str:
    """The source parameter a target parameter grows from (layer index remapped)."""
    prefix = ENCODER + "layers."
    if not target_name.startswith(prefix):
        return target_name
    index, rest = target_name[len(prefix) :].split(".", 1)
    return f"{prefix}{layer_map[int(index)]}.{rest}"


def _check_compatible(source: nn.Module, target: nn.Module) -> None:
    for name in ("source", "target"):
        model = source if name == "source" else target
        if not hasattr(model, "config"):
            raise TypeError(f"{name} must be a FlexBERT model, got {type(model).__name__}")
    s, t = source.config, target.config  # type: ignore[union-attr]
    if s.vocab_size != t.vocab_size:
        raise ConfigError(
            f"vocab_size differs (source {s.vocab_size}, target {t.vocab_size}): growth keeps "
            "the tokenizer; give the target the source's vocab_size"
        )
    if s.mlp.name != t.mlp.name:
        raise ConfigError(f"mlp differs (source {s.mlp.name!r}, target {t.mlp.name!r})")


@torch.no_grad()
def grow_model(
    target: nn.Module, source: nn.Module, tile_mode: str = "middle", layer_map: str = "gopher"
) -> GrowthReport:
    """Fill `target`'s weights (in place) from the smaller trained `source`; see the module doc.

    `target` should be freshly initialised: `center` keeps its values outside the source
    block, and weights the source lacks (a new classifier) keep theirs. Source encoder weights
    with no place in the target are an error (they would be lost); source head weights the
    target lacks (an MLM head when growing into a classifier) are dropped and reported.
    """
    if tile_mode not in TILE_MODES:
        raise ConfigError(f"tile_mode must be one of {TILE_MODES}, got {tile_mode!r}")
    _check_compatible(source, target)
    report = GrowthReport(
        layer_map=layer_mapping(source.config.num_layers, target.config.num_layers, layer_map)  # type: ignore[union-attr]
    )
    src, tgt = _named(source), _named(target)
    fused = _fused_parts(target)
    used: set[str] = set()
    shape = ("hidden_size", "num_layers")
    grows = any(getattr(source.config, k) != getattr(target.config, k) for k in shape)  # type: ignore[union-attr]
    for name, param in tgt.items():
        origin = _source_name(name, report.layer_map)
        if grows and name.startswith(FRESH_WHEN_GROWN):
            used.add(origin)
            report.kept_init.append(name)
            continue
        if origin not in src:
            report.kept_init.append(name)
            continue
        parts = fused.get(name, 1)
        try:
            grown = (
                _tile_fused(src[origin], param, parts, tile_mode)
                if parts > 1
                else tile_tensor(src[origin], param, tile_mode)
            )
        except ConfigError as err:
            raise ConfigError(f"{name} (from source {origin}): {err}") from None
        param.copy_(grown)
        report.copied[name] = origin
        used.add(origin)
    unused = [n for n in src if n not in used]
    lost = [n for n in unused if n.startswith(ENCODER)]
    if lost:
        raise ConfigError(
            f"source encoder weights with no place in the target: {lost[:6]}"
            f"{' ...' if len(lost) > 6 else ''}; the two configs differ in a component "
            "(norm bias, projection biases, position scheme?)"
        )
    report.dropped = unused
    return report
