"""One rank of the two-rank QA metric test (run by torch.distributed.run from the test).

Rank 0 holds a weak window of example 0 ("bank") and example 1; rank 1 holds example 0's
best window ("river"), or nothing at all with `empty`. Each rank computes exact match (which
gathers every rank's windows) and saves it to OUT/rank<R>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from flexbert.train.finetune_qa import build_qa_metrics


def main(out: str, empty: bool) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    metric = build_qa_metrics(["exact_match"])["exact_match"]
    if rank == 0:
        ids, spans, nulls = torch.tensor([0, 1]), torch.tensor([1.0, 5.0]), torch.zeros(2)
        metric.update(["bank", "shore"], [["river"], ["shore"]], ids, spans, nulls - 9)
    elif not empty:
        ids, spans, nulls = torch.tensor([0]), torch.tensor([7.0]), torch.zeros(1)
        metric.update(["river"], [["river"]], ids, spans, nulls - 9)
    torch.save(metric.compute(), Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "empty")
