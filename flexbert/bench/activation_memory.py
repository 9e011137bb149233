"""Activation memory of one MLM training step, on any device: the bytes autograd keeps for the
backward (saved-tensor hooks; the parameters' own storage not counted, autocast's bf16 copies
of them are), with and without activation checkpointing.
What decides the batch that fits at 8192 tokens, measured without a GPU.

    PYTHONPATH=. python -m flexbert.bench.activation_memory --size base --rows 1 --len 8192
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import torch

import flexbert


def saved_activation_bytes(model: torch.nn.Module, inputs: dict[str, Any], bf16: bool) -> int:
    """Bytes of the distinct storages autograd saves in one forward (the parameters' own
    excluded; autocast's low-precision copies of them included: they are held too)."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return t

    device = next(model.parameters()).device.type
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = model(**inputs).loss
    del loss
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in kept.items() if ptr not in weights)


def mlm_step_inputs(cfg: flexbert.ModelConfig, rows: int, length: int, device: str) -> dict:
    """Packed rows of random ids, 30% of positions labelled, as the training loaders give."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg.vocab_size // 2, cfg.vocab_size - 1, (rows * length,), generator=gen)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=gen) > 0.3, -100)
    inputs = {
        "input_ids": ids,
        "cu_seqlens": torch.arange(rows + 1, dtype=torch.int32) * length,
        "max_seqlen": length,
        "labels": labels,
        "label_positions": (labels != -100).nonzero().flatten(),
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def measure(size: str, rows: int, length: int, device: str, bf16: bool) -> dict[str, int]:
    """{"plain": bytes, "checkpointed": bytes} for one step of the `size` preset."""
    cfg = flexbert.ModelConfig.preset(size, sparse_prediction=True, max_seq_len=max(length, 8192))
    with torch.device(device):
        model = flexbert.FlexBertForMaskedLM(cfg)
    inputs = mlm_step_inputs(cfg, rows, length, device)
    out = {}
    for name, on in (("plain", False), ("checkpointed", True)):
        model.set_activation_checkpointing(on)
        out[name] = saved_activation_bytes(model, inputs, bf16)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="activation_memory",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
    )
    p.add_argument("--size", default="base")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--len", type=int, default=8192, dest="length")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as on a GPU")
    args = p.parse_args(argv)
    found = measure(args.size, args.rows, args.length, args.device, args.bf16)
    dtype = "bf16 autocast" if args.bf16 else "fp32"
    for name, n in found.items():
        amount = f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
        print(f"{args.size} {args.rows} x {args.length} tokens, {dtype}, {name}: {amount}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
