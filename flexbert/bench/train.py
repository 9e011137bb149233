"""MLM training throughput: forward + backward + AdamW step on packed rows.

Documents of variable length are packed greedily into full rows of `row_len` tokens (1024 by
default). Every model sees the same rows with the same 30% of positions masked: Hugging Face
models as a (rows, row_len) batch with an all-ones attention mask, FlexBERT as the same rows,
one sequence each, through cu_seqlens, with the masked positions listed (`label_positions`, as
the training loaders give them). Weights stay fp32 with bf16 autocast on a GPU (fp32 on
the CPU); the optimizer is AdamW, fused on a GPU. Tokens/s counts every token of the rows.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import torch

from flexbert.bench.runners import ModelSpec, build_model
from flexbert.bench.timing import Timing, time_passes
from flexbert.bench.workloads import ModelBatch, mlm_mask


def train_batches(
    rows: torch.Tensor,
    batch_rows: int,
    num_batches: int,
    layout: str,
    mask_id: int,
    device: str,
) -> list[ModelBatch]:
    """`num_batches` masked batches of `batch_rows` rows each (cycling through the rows)."""
    row_len = rows.shape[1]
    out = []
    for i in range(num_batches):
        index = torch.arange(i * batch_rows, (i + 1) * batch_rows) % rows.shape[0]
        ids, labels = mlm_mask(rows[index], mask_id, seed=i)
        if layout == "packed":
            cu = torch.arange(batch_rows + 1, dtype=torch.int32) * row_len
            kwargs = {
                "input_ids": ids.flatten().to(device),
                "cu_seqlens": cu.to(device),
                "max_seqlen": row_len,
                "labels": labels.flatten().to(device),
                # as flexbert's loaders hand them over: the sparse head needs no host sync
                "label_positions": (labels.flatten() != -100).nonzero().flatten().to(device),
            }
        else:
            kwargs = {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device),
            }
        out.append(ModelBatch(kwargs, ids.numel(), batch_rows, tuple(ids.shape)))
    return out


def make_step(
    spec: ModelSpec,
    rows: torch.Tensor,
    batch_rows: int,
    num_batches: int,
    device: str,
    mask_id: int,
    sparse_prediction: bool = False,
) -> tuple[Callable[[], None], int]:
    """A closure running one optimizer step (cycling over prepared batches), tokens per step."""
    model = build_model(
        spec,
        device,
        torch.float32,
        mlm=True,
        sparse_prediction=sparse_prediction,
        train_len=rows.shape[1],
    )
    cuda = device.startswith("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    batches = train_batches(rows, batch_rows, num_batches, spec.layout, mask_id, device)
    cycle = itertools.cycle(batches)

    def step() -> None:
        batch = next(cycle)
        with autocast:
            loss = model(**batch.kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batches[0].num_tokens


def train_throughput(
    spec: ModelSpec,
    rows: torch.Tensor,
    batch_rows: int,
    steps: int,
    warmup: int,
    device: str,
    mask_id: int,
    sparse_prediction: bool = False,
) -> tuple[Timing, int]:
    """Seconds per optimizer step (median over `steps`) and the tokens in one step."""
    num_batches = min(steps + warmup, 8)
    step, tokens = make_step(
        spec, rows, batch_rows, num_batches, device, mask_id, sparse_prediction
    )
    return time_passes(step, device, warmup=warmup, repeats=steps), tokens
