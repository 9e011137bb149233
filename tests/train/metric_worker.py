"""One rank of the two-rank metric tests (run by torch.distributed.run from the tests).

`split` / `empty` (question answering): rank 0 holds a weak window of example 0 ("bank") and
example 1; rank 1 holds example 0's best window ("river"), or nothing at all with `empty`.
`retrieval`: each rank holds half of the eval pairs and three ranking metrics that share one
store. Each rank computes its metrics (which gathers every rank's state) and saves them to
OUT/rank<R>.pt.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from flexbert.train.finetune_qa import build_qa_metrics
from flexbert.train.finetune_retrieval import retrieval_metrics

RETRIEVAL = ["recall_at_1", "recall_at_10", "mrr_at_10"]


def retrieval_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """12 query/positive pairs (the same on every rank: each takes its half)."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=-1)
    docs = torch.nn.functional.normalize(queries + torch.randn(12, 8, generator=gen), dim=-1)
    return queries, docs


def main(out: str, case: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if case == "retrieval":
        metrics = copy.deepcopy(retrieval_metrics(RETRIEVAL))  # as Composer copies them
        queries, docs = retrieval_pairs()
        mine = slice(6 * rank, 6 * rank + 6)
        for m in metrics.values():
            m.update(queries[mine], docs[mine])
        result = [float(m.compute()) for m in metrics.values()]
    else:
        metric = build_qa_metrics(["exact_match"])["exact_match"]
        if rank == 0:
            ids, spans, nulls = torch.tensor([0, 1]), torch.tensor([1.0, 5.0]), torch.zeros(2)
            metric.update(["bank", "shore"], [["river"], ["shore"]], ids, spans, nulls - 9)
        elif case != "empty":
            ids, spans, nulls = torch.tensor([0]), torch.tensor([7.0]), torch.zeros(1)
            metric.update(["river"], [["river"]], ids, spans, nulls - 9)
        result = metric.compute()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
