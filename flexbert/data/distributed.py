"""The few collectives the data loaders need, no-ops in a single process.

Under a multi-process launcher (Composer's, torchrun) `torch.distributed` is initialised; the
packed loader then gathers every rank's packer state into its checkpoint state and agrees
with the other ranks on where an epoch ends, so no rank waits for a step the others never take.
These run on a CPU (gloo) group of their own: a host-side agreement never waits for the GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this process's global rank, number of ranks); (0, 1) without torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if _active() else (0, 1)


_CPU_GROUPS: dict[int, Any] = {}  # id(default group) -> its gloo twin


def _cpu_group() -> Any:
    """A gloo group over all ranks (created once, collectively, on first use)."""
    if dist.get_backend() == "gloo":
        return None  # the default group already is one
    key = id(dist.group.WORLD)
    if key not in _CPU_GROUPS:
        _CPU_GROUPS[key] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[key]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (all ranks must call this together)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_cpu_group())
    return out


def _reduce_int(value: int, op: Any) -> int:
    if not _active():
        return value
    out = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(out, op=op, group=_cpu_group())
    return int(out.item())  # a CPU tensor: no device to wait for


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank (all ranks must call this together)."""
    return bool(_reduce_int(int(flag), dist.ReduceOp.MIN))


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on at least one rank (all ranks must call this together)."""
    return bool(_reduce_int(int(flag), dist.ReduceOp.MAX))


def max_over_ranks(value: int) -> int:
    """The largest of every rank's host-side `value` (all ranks must call this together)."""
    return _reduce_int(value, dist.ReduceOp.MAX)
