"""Where the time goes: torch.profiler top ops of FlexBERT and HF ModernBERT on one set.

    python -m flexbert.bench.profiling --device cpu --size tiny --workload fixed-short

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
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flexbert-bench-profile", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="tiny")
    p.add_argument("--backend", default="sdpa", help="FlexBERT backend")
    p.add_argument("--workload", default="fixed-short", choices=workloads.WORKLOAD_KEYS)
    p.add_argument("--short-len", type=int, default=512)
    p.add_argument("--long-len", type=int, default=8192)
    p.add_argument("--num-docs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    w = workloads.make_workload(args.workload, args.short_len, args.long_len)
    docs = workloads.make_documents(
        workloads.sample_lengths(w, args.num_docs), runners.id_range([args.size])
    )
    for spec in (
        runners.ModelSpec("flexbert", args.size, args.backend),
        runners.ModelSpec("hf-modernbert", args.size, "sdpa"),
    ):
        model = runners.build_model(spec, args.device, dtype)
        pad = runners.special_ids(spec)["pad"]
        batches = workloads.make_batches(docs, args.batch_size, spec.layout, args.device, pad)
        run_pass = _make_pass(model, batches)
        run_pass()  # warm-up
        print(f"== {spec.name} {spec.variant} on {w.label}")
        print(profile_table(run_pass, args.device, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
