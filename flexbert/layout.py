"""Padding as a data layout.

`unpadded`: every layer sees (T, D) with T real tokens; sequences are delimited by
`cu_seqlens` (B + 1,) int32 and `max_seqlen` (a host int, so no device sync per layer).
`padded`: every layer sees (B, L, D) with a (B, L) bool mask.

A `Layout` is built once per forward at the model entry. It carries what attention backends
need and caches what they derive from it (masks, per-token sequence ids), so a mask is built
once per forward, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Layout:
    padded: bool
    positions: torch.Tensor  # (T,) or (B, L) position ids used by RoPE / absolute embeddings
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int32, unpadded only
    max_seqlen: int | None = None  # unpadded only
    attention_mask: torch.Tensor | None = None  # (B, L) bool, padded only
    # Where the unpadded tokens came from when the caller passed a padded batch.
    indices: torch.Tensor | None = None  # (T,) flat indices into B * L
    batch_shape: tuple[int, int] | None = None  # (B, L) of the caller's padded batch
    # Known on the host: unpadded, T != B * max_seqlen; padded, checked once per forward.
    has_padding: bool = True
    cache: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.padded:
            self.has_padding = self.positions.shape[0] != self.num_seqs * self.max_seqlen

    @property
    def num_seqs(self) -> int:
        if self.padded:
            return self.attention_mask.shape[0]
        return self.cu_seqlens.shape[0] - 1

    def seq_ids(self) -> torch.Tensor:
        """(T,) sequence index of every token (unpadded layout)."""
        if "seq_ids" not in self.cache:
            self.cache["seq_ids"] = seq_ids_from_cu_seqlens(
                self.cu_seqlens, self.positions.shape[0]
            )
        return self.cache["seq_ids"]

    def pos_in_seq(self) -> torch.Tensor:
        """(T,) offset of every token inside its own sequence (unpadded layout)."""
        if "pos_in_seq" not in self.cache:
            starts = self.cu_seqlens[:-1].long()[self.seq_ids()]
            self.cache["pos_in_seq"] = (
                torch.arange(self.positions.shape[0], device=starts.device) - starts
            )
        return self.cache["pos_in_seq"]

    def row_index(self) -> torch.Tensor:
        """(T,) flat index of each unpadded token in a (num_seqs * max_seqlen) row buffer."""
        if "row_index" not in self.cache:
            self.cache["row_index"] = self.seq_ids() * self.max_seqlen + self.pos_in_seq()
        return self.cache["row_index"]

    def internal_positions(self, flat_positions: torch.Tensor) -> torch.Tensor:
        """Indices into the caller's flattened tokens -> indices into the internal tokens
        (the same unless a padded batch was unpadded here; there, positions must be real
        tokens). No host sync."""
        if self.indices is None:
            return flat_positions
        internal = self.cached("internal_index", self._internal_index)
        return internal.index_select(0, flat_positions)

    def _internal_index(self) -> torch.Tensor:
        """(B * L,) internal token index of every caller slot, -1 for padding."""
        batch, seqlen = self.batch_shape
        out = torch.full((batch * seqlen,), -1, dtype=torch.long, device=self.indices.device)
        tokens = torch.arange(self.indices.shape[0], device=self.indices.device)
        return out.index_copy_(0, self.indices, tokens)

    def cached(self, key: Any, make) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def can_read_values(t: torch.Tensor) -> bool:
    """Whether input checks may read `t`'s values: only where that costs no host-device sync
    (a CPU tensor) and cannot break a graph (not while torch.compile traces). GPU inputs get
    the shape checks only; the packed GPU path never waits for the device."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _short(values: list[int], limit: int = 12) -> str:
    if len(values) <= limit:
        return str(values)
    head = ", ".join(map(str, values[: limit // 2]))
    return f"[{head}, ..., {values[-1]}] ({len(values)} entries)"


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None) -> None:
    """Refuse `cu_seqlens` that do not describe `total` packed tokens, with a message that
    says what is valid. Shape and dtype always; values only when `can_read_values`."""
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            "cu_seqlens must be 1-D (num_seqs + 1,) offsets starting at 0, "
            f"got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if not can_read_values(cu_seqlens):
        return
    cu = cu_seqlens.tolist()  # host memory: no sync on the CPU
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if cu[0] != 0 or cu[-1] != total or min(lengths) < 0:
        raise ValueError(
            "cu_seqlens must start at 0, never decrease, and end at the number of tokens "
            f"({total}); got {_short(cu)}"
        )
    if max_seqlen is not None and max_seqlen < max(lengths):
        raise ValueError(
            f"max_seqlen={max_seqlen} is shorter than the longest sequence in cu_seqlens "
            f"({max(lengths)} tokens); pass at least {max(lengths)}, or None to compute it"
        )


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)  # (T,)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """RoPE positions that restart at every packed sequence, without a host sync."""
    seq = seq_ids_from_cu_seqlens(cu_seqlens, total)
    return torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]


def unpad(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, L) mask -> flat indices of real tokens, cu_seqlens (B + 1,) int32, max_seqlen."""
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)  # (B,)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()  # (T,)
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    return indices, cu_seqlens, max_seqlen


def repad(x: torch.Tensor, layout: Layout, fill: float = 0.0) -> torch.Tensor:
    """(T, ...) unpadded values -> (B, L, ...) in the caller's padded shape."""
    batch, seqlen = layout.batch_shape
    out = x.new_full((batch * seqlen, *x.shape[1:]), fill)
    out.index_copy_(0, layout.indices, x)
    return out.view(batch, seqlen, *x.shape[1:])


def to_rows(x: torch.Tensor, layout: Layout, fill: float = 0.0) -> torch.Tensor:
    """Per-token values in the internal layout -> (num_seqs, L, ...) rows, `fill` past each
    sequence's end. L is the caller's padded length, or max_seqlen for a packed batch."""
    if layout.padded:
        mask = layout.attention_mask.bool()  # (B, L)
        return x.masked_fill(~mask.reshape(*mask.shape, *[1] * (x.dim() - 2)), fill)
    if layout.indices is not None:
        return repad(x, layout, fill)
    rows = x.new_full((layout.num_seqs * layout.max_seqlen, *x.shape[1:]), fill)
    rows.index_copy_(0, layout.row_index(), x)
    return rows.view(layout.num_seqs, layout.max_seqlen, *x.shape[1:])
