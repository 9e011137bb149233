"""One rank of the two-rank tests, run once per test session by torch.distributed.run.

Every case runs in the same two processes (one launch instead of one per test) and saves
OUT/<case>/rank<R>.pt for its test to compare with one process doing the whole job:
- `split` / `empty` (question answering): rank 0 holds a weak window of example 0 ("bank") and
  example 1; rank 1 holds example 0's best window ("river"), or nothing at all with `empty`.
  Each rank saves its exact-match score.
- `retrieval`: each rank holds half of the eval pairs and three ranking metrics that share one
  store; each rank saves its metric values.
- `negatives` (sentence embeddings) / `colbert`: each rank trains on half of 6 pairs against
  every rank's positives (`gather_candidates` / `gather_documents`; ColBERT's documents are cut
  to another width than the other rank's). `hard_negatives`: the same through the retrieval
  Composer model with 2 hard negatives per pair, so each rank's queries are scored against 18
  candidates. Each rank saves the DDP-averaged gradient and the mean loss.
- `fsdp1` / `fsdp2`: the `sharded_models` are sharded across the two ranks (FSDP1 with one
  unit per layer as Composer wraps them, FSDP2's `fully_shard`) and gathered back with
  `runtime.full_model`; rank 0 saves what it got (None on rank 1) and writes the MLM model's
  Hugging Face export into OUT/<case>/hf. Each rank also counts the sharded model's
  parameters (`runtime.parameter_count`, what summaries report without gathering).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from flexbert import (
    FlexBertForColBERT,
    FlexBertForMaskedLM,
    FlexBertForSentenceEmbedding,
    ModelConfig,
)
from flexbert.train.finetune_colbert import gather_documents
from flexbert.train.finetune_qa import build_qa_metrics
from flexbert.train.finetune_retrieval import gather_candidates, retrieval_metrics

CASES = ["split", "empty", "retrieval", "negatives", "colbert", "hard_negatives", "fsdp1", "fsdp2"]
RETRIEVAL = ["recall_at_1", "recall_at_10", "mrr_at_10"]


def retrieval_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """12 query/positive pairs (the same on every rank: each takes its half)."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=-1)
    docs = torch.nn.functional.normalize(queries + torch.randn(12, 8, generator=gen), dim=-1)
    return queries, docs


def embedding_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """6 queries of 12 tokens and their 6 positives of 9 tokens."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.randint(5, 512, (6, 12), generator=gen)
    positives = torch.randint(5, 512, (6, 9), generator=gen)
    return queries, positives


def hard_negative_batch() -> dict[str, torch.Tensor]:
    """embedding_batch's 6 pairs as PairCollator lays them out, with 2 hard negatives each."""
    queries, positives = embedding_batch()
    negatives = torch.randint(5, 512, (6, 2, 9), generator=torch.Generator().manual_seed(2))
    return {
        "input_ids": queries,
        "attention_mask": torch.ones_like(queries),
        "cand_ids": positives,
        "cand_mask": torch.ones_like(positives),
        "neg_ids": negatives,
        "neg_mask": torch.ones_like(negatives),
    }


def colbert_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """6 queries, 6 documents of 4 to 9 tokens (padded to 9) and their mask."""
    gen = torch.Generator().manual_seed(1)
    queries = torch.randint(5, 512, (6, 6), generator=gen)
    docs = torch.randint(5, 512, (6, 9), generator=gen)
    lengths = torch.tensor([4, 6, 5, 9, 7, 8])  # rank 0's widest: 6, rank 1's: 9
    mask = torch.arange(9)[None, :] < lengths[:, None]
    return queries, docs * mask, mask


def embedding_model() -> FlexBertForSentenceEmbedding:
    torch.manual_seed(0)
    return FlexBertForSentenceEmbedding(ModelConfig.preset("tiny")).eval()


def colbert_model() -> FlexBertForColBERT:
    torch.manual_seed(0)
    return FlexBertForColBERT(ModelConfig.preset("tiny"), colbert_dim=16, query_length=8)


def sharded_models() -> dict[str, torch.nn.Module]:
    """One model per constructor kind: config only, config + temperature, ColBERT settings."""
    torch.manual_seed(3)
    tiny = ModelConfig.preset("tiny")
    return {
        "mlm": FlexBertForMaskedLM(tiny),
        "embedding": FlexBertForSentenceEmbedding(tiny, temperature=0.2),
        "colbert": FlexBertForColBERT(tiny, colbert_dim=16, query_length=8, skiplist_ids=[7]),
    }


def shard(model: torch.nn.Module, case: str) -> torch.nn.Module:
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    if case == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=model.fsdp_wrap_fn)
    return FullyShardedDataParallel(
        model, device_id=torch.device("cpu"), auto_wrap_policy=policy, use_orig_params=True
    )


def gathered(case: str, out: Path, rank: int):
    from flexbert.train.runtime import full_model, is_sharded, parameter_count

    got = {}
    for name, model in sharded_models().items():
        sharded = shard(model, case)
        assert is_sharded(sharded)
        # Rank 1 counts before the gathering and rank 0 after it: were counting a collective,
        # the ranks would meet in different ones and the launch would fail.
        counted = parameter_count(sharded) if rank == 1 else None
        full = full_model(sharded)
        counted = parameter_count(sharded) if rank == 0 else counted
        if rank == 0:
            got[name] = {
                "class": type(full).__name__,
                "kwargs": full.init_kwargs(),
                "sharded": is_sharded(full),
                "state": full.state_dict(),
                "parameters": counted,
            }
            if name == "mlm":
                got[name]["hf"] = str(full.save_hf(out / "hf"))
        else:
            assert full is None and counted == sharded_models()[name].num_params()
    return got or None


def averaged_training_step(model, loss: torch.Tensor, rank: int, world: int):
    """Backpropagate; return what DDP would apply (the rank-mean gradient) and the mean loss."""
    loss.backward()
    grad = model.model.layers[1].mlp.Wi.weight.grad.clone()
    dist.all_reduce(grad)
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    return {"grad": grad / world, "loss": torch.stack(losses).mean()}


def run_case(case: str, rank: int, world: int, out: Path):
    if case.startswith("fsdp"):
        return gathered(case, out, rank)
    mine = slice(rank * 3, rank * 3 + 3)
    if case == "negatives":
        model, (queries, positives) = embedding_model(), embedding_batch()
        loss = model(
            queries[mine], candidates=(positives[mine], None), candidate_pool=gather_candidates
        ).loss
        return averaged_training_step(model, loss, rank, world)
    if case == "hard_negatives":
        from flexbert.train.finetune_retrieval import ComposerFlexBertRetrieval

        model = ComposerFlexBertRetrieval(embedding_model()).train()
        loss = model({k: v[mine] for k, v in hard_negative_batch().items()}).loss
        return averaged_training_step(model.model, loss, rank, world)
    if case == "colbert":
        model, (queries, docs, mask) = colbert_model(), colbert_batch()
        width = int(mask[mine].sum(-1).max())  # each rank's collator pads to its own widest
        loss = model(
            queries[mine],
            candidates=(docs[mine, :width], mask[mine, :width]),
            candidate_pool=gather_documents,
        ).loss
        return averaged_training_step(model, loss, rank, world)
    if case == "retrieval":
        metrics = copy.deepcopy(retrieval_metrics(RETRIEVAL))  # as Composer copies them
        queries, docs = retrieval_pairs()
        half = slice(6 * rank, 6 * rank + 6)
        for m in metrics.values():
            m.update(queries[half], docs[half])
        return [float(m.compute()) for m in metrics.values()]
    metric = build_qa_metrics(["exact_match"])["exact_match"]
    if rank == 0:
        ids, spans, nulls = torch.tensor([0, 1]), torch.tensor([1.0, 5.0]), torch.zeros(2)
        metric.update(["bank", "shore"], [["river"], ["shore"]], ids, spans, nulls - 9)
    elif case != "empty":
        ids, spans, nulls = torch.tensor([0]), torch.tensor([7.0]), torch.zeros(1)
        metric.update(["river"], [["river"]], ids, spans, nulls - 9)
    return metric.compute()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in CASES:
        folder = Path(out) / case
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(run_case(case, rank, world, folder), folder / f"rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
