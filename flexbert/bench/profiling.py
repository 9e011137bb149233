"""Where the time goes: torch.profiler top ops of FlexBERT and HF ModernBERT on one set.

    python -m flexbert.bench.profiling --device cpu --size tiny --workload fixed-short
    python -m flexbert.bench.profiling --device cuda --size base --backend varlen --train

Both models see the same documents (FlexBERT packed, HF padded); the tables list the ops by
self time, so a gap in the benchmark's ratio can be traced to the ops that cause it.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from flexbert.bench import runners, workloads
from flexbert.bench.suite import _make_pass


def profile_table(run_pass, device: str, row_limit: int = 15) -> str:
    """Top ops by self time of one (already warmed-up) pass."""
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run_pass()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    sort = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flexbert-bench-profile", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="tiny")
    p.add_argument(
        "--backend", default="sdpa", help="FlexBERT backend, tags allowed: varlen+bf16rope"
    )
    p.add_argument("--workload", default="fixed-short", choices=workloads.WORKLOAD_KEYS)
    p.add_argument("--short-len", type=int, default=512)
    p.add_argument("--long-len", type=int, default=8192)
    p.add_argument("--num-docs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train", action="store_true", help="profile one MLM training step instead")
    p.add_argument("--train-rows", type=int, default=32)
    p.add_argument("--train-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = (
        runners.ModelSpec.parse("flexbert", args.size, args.backend),
        runners.ModelSpec("hf-modernbert", args.size, "sdpa"),
    )
    for spec in specs:
        if args.train:
            run_pass, what = (
                _train_step(spec, args),
                f"MLM step {args.train_rows} x {args.train_len}",
            )
        else:
            run_pass, what = _inference_pass(spec, args)
        run_pass()  # warm-up
        print(f"== {spec.name} {spec.variant} on {what}")
        print(profile_table(run_pass, args.device, args.rows))
    return 0


def _inference_pass(spec: runners.ModelSpec, args: argparse.Namespace):
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    w = workloads.make_workload(args.workload, args.short_len, args.long_len)
    docs = workloads.make_documents(
        workloads.sample_lengths(w, args.num_docs), runners.id_range([args.size])
    )
    model = runners.build_model(spec, args.device, dtype)
    pad = runners.special_ids(spec)["pad"]
    batches = workloads.make_batches(docs, args.batch_size, spec.layout, args.device, pad)
    return _make_pass(model, batches), w.label


def _train_step(spec: runners.ModelSpec, args: argparse.Namespace):
    """One optimizer step of the benchmark's MLM training (sparse prediction), same rows."""
    from flexbert.bench.train import make_step

    rows = workloads.training_rows(
        args.train_rows * 2, args.train_len, runners.id_range([args.size])
    )
    mask_id = runners.special_ids(spec)["mask"]
    step, _ = make_step(
        spec, rows, args.train_rows, 2, args.device, mask_id, sparse_prediction=True
    )
    return step


if __name__ == "__main__":
    sys.exit(main())
