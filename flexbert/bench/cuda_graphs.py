"""CUDA graphs for inference: the `+cudagraph` lever of flexbert-bench.

FlexBERT's forward on packed input never waits for the GPU (`max_seqlen` comes from the host,
positions and masks are built on the device), so a whole forward can be captured once per
batch shape and replayed with one launch, removing the per-kernel launch cost that dominates
small batches. Inputs are copied into the captured tensors before each replay; the returned
output is the graph's own tensor, overwritten by the next replay of the same shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

WARMUP_RUNS = 2  # before capture: lazy inits, cuBLAS workspaces, torch.compile


def signature(kwargs: dict[str, Any]) -> tuple:
    """What a captured graph is specific to: tensor shapes and dtypes, the other values."""
    return tuple(
        (k, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v)
        for k, v in sorted(kwargs.items())
    )


class GraphedForward(nn.Module):
    """`model(**kwargs)` through one CUDA graph per input signature (captured on first use).

    Beyond `max_graphs` signatures the model runs eagerly, so a stream of ever-new shapes
    costs memory for at most `max_graphs` graphs. Each graph has its own memory pool, so
    graphs of different shapes may be replayed in any order.
    """

    def __init__(self, model: nn.Module, max_graphs: int = 8) -> None:
        super().__init__()
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple[dict[str, Any], torch.cuda.CUDAGraph, Any]] = {}

    def forward(self, **kwargs: Any) -> Any:
        key = signature(kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.model(**kwargs)
            entry = self.graphs[key] = self._capture(kwargs)
        static_inputs, graph, static_output = entry
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                static_inputs[name].copy_(value)
        graph.replay()
        return static_output

    def _capture(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], torch.cuda.CUDAGraph, Any]:
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor) and not value.is_cuda:
                raise ValueError(f"CUDA graphs need CUDA tensors; '{name}' is on {value.device}")
        static_inputs = {
            k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.model(**static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.model(**static_inputs)
        return static_inputs, graph, static_output
