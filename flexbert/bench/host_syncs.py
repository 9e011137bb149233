"""Where the host waits for the device: operations whose result size or value the CPU needs.

On a GPU each such operation (`.item()`, `bool(t)`, `nonzero`, a boolean index, ...) stops the
host until every queued kernel has run, so the next kernels launch late, a CUDA graph cannot be
captured and torch.compile splits its graph. `HostSyncRecorder` lists them on any device (so a
CPU test can guard the packed path) by watching the dispatched ATen operations, with the first
FlexBERT source line that called each one. On CUDA, `cuda_sync_warnings` asks the driver-side
check of torch itself (`torch.cuda.set_sync_debug_mode`).

    with HostSyncRecorder() as syncs:
        model(**packed_batch, labels=labels, label_positions=positions).loss.backward()
    assert not syncs.calls, syncs.calls
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Output size or value depends on the data: the host must wait for it.
SYNCING_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,  # returns a Python bool
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
_PACKAGE = str(Path(__file__).resolve().parents[1])  # .../flexbert


def _is_boolean_index(func, args) -> bool:
    """t[mask] with a bool mask: the result's size is the mask's count of True."""
    if func not in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return False
    return any(i is not None and i.dtype == torch.bool for i in args[1])


def _is_device_to_host(func, args, kwargs) -> bool:
    """.cpu(), .to("cpu"), .tolist() / .numpy() of a GPU tensor, or a copy into host memory."""
    if func is aten._to_copy.default:
        target = kwargs.get("device")
        return args[0].device.type != "cpu" and target is not None and target.type == "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def is_syncing(func, args, kwargs) -> bool:
    if func in SYNCING_OPS:
        return True
    if func is aten.repeat_interleave.Tensor:  # its output size is the sum of the repeats
        return kwargs.get("output_size") is None
    return _is_boolean_index(func, args) or _is_device_to_host(func, args, kwargs)


def flexbert_caller() -> str:
    """'path:line' of the innermost FlexBERT frame on the stack (not this module)."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_PACKAGE) and not frame.filename.endswith("host_syncs.py"):
            return f"{Path(frame.filename).relative_to(Path(_PACKAGE).parent)}:{frame.lineno}"
    return "outside flexbert"


class HostSyncRecorder(TorchDispatchMode):
    """Records (op, caller) for every operation that would make the host wait for a GPU.

    It sees dispatched operations only: not a kernel's own internal waits, and on the CPU not
    `.tolist()` / `.numpy()` (they read host memory without an operation; on a GPU they copy to
    the host and are seen). Eager code only: torch.compile refuses to trace under a dispatch
    mode. `cuda_sync_warnings` (torch's own check, CUDA only) covers all of these."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_syncing(func, args, kwargs or {}):
            self.calls.append((str(func.overloadpacket.__name__), flexbert_caller()))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_sync_warnings() -> Iterator[list[str]]:
    """Collect torch's own 'synchronizing CUDA operation' warnings (CUDA only): each entry
    is the Python file:line that triggered one."""
    found: list[str] = []
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    found += [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
