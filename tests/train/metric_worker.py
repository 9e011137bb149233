"""One rank of the two-rank metric tests (run by torch.distributed.run from the tests).

`split` / `empty` (question answering): rank 0 holds a weak window of example 0 ("bank") and
example 1; rank 1 holds example 0's best window ("river"), or nothing at all with `empty`.
`retrieval`: each rank holds half of the eval pairs and three ranking metrics that share one
store. Each rank computes its metrics (which gathers every rank's state) and saves them to
OUT/rank<R>.pt. `colbert`: each rank trains on half of 6 pairs against every rank's documents
(`gather_documents`, its documents cut to another width than the other rank's) and rank 0
saves the DDP-averaged gradient and the mean loss to OUT/rank0.pt.
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


def colbert_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """6 queries, 6 documents of 4 to 9 tokens (padded to 9) and their mask."""
    gen = torch.Generator().manual_seed(1)
    queries = torch.randint(5, 512, (6, 6), generator=gen)
    docs = torch.randint(5, 512, (6, 9), generator=gen)
    lengths = torch.tensor([4, 6, 5, 9, 7, 8])  # rank 0's widest: 6, rank 1's: 9
    mask = torch.arange(9)[None, :] < lengths[:, None]
    return queries, docs * mask, mask


def colbert_rank(out: str, rank: int, world: int) -> None:
    from flexbert import FlexBertForColBERT, ModelConfig
    from flexbert.train.finetune_colbert import gather_documents

    torch.manual_seed(0)
    model = FlexBertForColBERT(ModelConfig.preset("tiny"), colbert_dim=16, query_length=8)
    queries, docs, mask = colbert_batch()
    mine = slice(rank * 3, rank * 3 + 3)
    width = int(mask[mine].sum(-1).max())  # each rank's collator pads to its own widest
    result = model(
        queries[mine],
        candidates=(docs[mine, :width], mask[mine, :width]),
        candidate_pool=gather_documents,
    )
    result.loss.backward()
    grad = model.model.layers[1].mlp.Wi.weight.grad.clone()
    dist.all_reduce(grad)
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, result.loss.detach())
    if rank == 0:
        saved = {"grad": grad / world, "loss": torch.stack(losses).mean()}
        torch.save(saved, Path(out) / "rank0.pt")


def main(out: str, case: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if case == "colbert":
        colbert_rank(out, rank, dist.get_world_size())
        dist.barrier()
        dist.destroy_process_group()
        return
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
