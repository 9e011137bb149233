"""One rank of the two-rank resumption test (run by torch.distributed.run from the test).

Each rank reads packed batches, taking the loader state (a collective) after each, until the
ranks have read different numbers of documents (at most `k` batches), reads the rest of the
epoch, then a fresh loader resumes from that state and reads its epoch. Then it reads one
epoch as an evaluation loader would (finish_every_rank) and as a training loader would, without
shuffling; then the ODD split (an odd number of documents) through the packed and the padded
evaluation loaders. Everything is saved to OUT/rank<R>.pt for the test to compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from flexbert.data.collate import PaddedMLMCollator
from flexbert.data.loader import PackedMLMLoader, padded_eval_loader, streaming_dataset
from flexbert.data.masking import MLMMasker
from flexbert.data.tokenizer import load_tokenizer
from flexbert.train.data_spec import flexbert_data_spec


def make_loader(shards: str, tokenizer, shuffle: bool = True, **kw) -> PackedMLMLoader:
    ds = streaming_dataset(shards, split="train", shuffle=shuffle, seed=5, batch_size=16)
    masker = MLMMasker.from_tokenizer(tokenizer, 0.3)
    return PackedMLMLoader(ds, 2, 100, masker, tokenizer.pad_token_id, buffer_size=32, seed=5, **kw)


def main(shards: str, tokenizer_dir: str, out: str, k: int, odd: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = load_tokenizer(tokenizer_dir)
    loader = make_loader(shards, tokenizer)
    it = iter(loader)
    first = []
    for _ in range(k):  # the same decision on every rank: the state is gathered
        first.append(next(it))
        state = loader.state_dict()
        if len({r["consumed"] for r in state["ranks"]}) > 1:
            break
    rest = list(it)
    del it, loader
    dist.barrier()
    resumed = make_loader(shards, tokenizer)
    resumed.load_state_dict(state)
    again = list(resumed)
    del resumed
    dist.barrier()
    reads = {}
    for finish in (True, False):
        read = list(make_loader(shards, tokenizer, shuffle=False, finish_every_rank=finish))
        reads[finish] = [b["input_ids"].numel() if b["labels"].ne(-100).any() else 0 for b in read]
        dist.barrier()
    # the odd split: packed evaluation (tokens of batches with labels), then padded evaluation
    # (labels on every real token, none on the blank rows that keep the ranks in step)
    packed = list(make_loader(odd, tokenizer, shuffle=False, finish_every_rank=True))
    odd_reads = [b["input_ids"].numel() if b["labels"].ne(-100).any() else 0 for b in packed]
    dist.barrier()
    collator = PaddedMLMCollator(tokenizer.pad_token_id, 128)
    dataset = streaming_dataset(odd, split="train", shuffle=False, seed=5, batch_size=16)
    loader = padded_eval_loader(dataset, 4, collator)
    flexbert_data_spec(loader)  # Composer takes it on several ranks (no DistributedSampler)
    padded = [int(b["labels"].ne(-100).sum()) for b in loader]
    dist.barrier()
    torch.save(
        {"first": first, "rest": rest, "again": again, "state": state, "reads": reads}
        | {"odd_reads": odd_reads, "padded": padded},
        Path(out) / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
