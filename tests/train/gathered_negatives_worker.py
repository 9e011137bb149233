"""One rank of the gathered-negatives test (run by torch.distributed.run from the test).

Rank r embeds its half of 6 (query, positive) pairs, scores its queries against every rank's
positives through `gather_candidates`, backpropagates, and averages gradients over ranks as
DDP does; rank 0 saves the averaged gradient and the loss for the test to compare with one
process scoring all 6 queries against all 6 positives.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from flexbert import FlexBertForSentenceEmbedding, ModelConfig
from flexbert.train.finetune_retrieval import gather_candidates


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randint(5, 512, (6, 12), generator=gen)
    positives = torch.randint(5, 512, (6, 9), generator=gen)
    return queries, positives


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = FlexBertForSentenceEmbedding(ModelConfig.preset("tiny")).eval()
    queries, positives = batch()
    mine = slice(rank * 3, rank * 3 + 3)
    out_ = model(
        queries[mine], candidates=(positives[mine], None), candidate_pool=gather_candidates
    )
    out_.loss.backward()
    grad = model.model.layers[1].mlp.Wi.weight.grad.clone()
    dist.all_reduce(grad)
    grad /= world
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, out_.loss.detach())
    if rank == 0:
        torch.save({"grad": grad, "loss": torch.stack(losses).mean()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
