"""Loading MDS shards with mosaicml-streaming, packed (resumable) or padded.

`TokenDataset` is a `StreamingDataset` over the shards written by `flexbert.data.mds`, local or
remote, with a seeded shuffle. `PackedMLMLoader` packs its documents into unpadded microbatches,
masks them and prefetches in a background thread; its `state_dict()` / `load_state_dict()`
resume mid-epoch exactly: the same next batches, the same masks. For Composer, which saves
`dataloader.dataset.state_dict(num_samples, from_beginning)`, `PackedMLMLoader.dataset` is an
adapter that forwards to the loader's own state (the sample count Composer passes is ignored,
because packed batches do not contain a fixed number of documents).

With several ranks (torch.distributed initialised) each rank packs its own partition of the
shuffled documents. The state then holds every rank's packer state (gathered when it is taken,
so all ranks must take it together, as Composer does): the dataset resumes at the count all
ranks have read, and each rank re-reads its own extra documents and restores its own buffer,
so every rank continues exactly. Ranks agree on the end of an epoch (one tiny all-reduce per
batch): when one rank's documents run out, all stop, and no rank waits for a step the others
never take. An evaluation loader (`finish_every_rank=True`) reads each document of its split
exactly once over all ranks, in sample order (`eval_share`: StreamingDataset's own partition
pads every rank to the same count by repeating documents, which would score some twice), and
reads on until every rank's documents are done: a rank that runs out first yields empty
batches (one pad token, no label) meanwhile, so the ranks still step together and no val
document goes unscored. `padded_eval_loader` does the same for padded batches with blank
rows.
Resuming on a different number of ranks restarts the buffers (with a warning).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset

from flexbert.data.collate import PaddedMLMCollator
from flexbert.data.distributed import all_ranks, any_rank, gather_objects, rank_and_world
from flexbert.data.errors import DataError
from flexbert.data.masking import IGNORE_INDEX, MLMMasker, batch_generator, label_positions
from flexbert.data.packing import PackedBatch, Prefetcher, SequencePacker
from flexbert.data.token_dataset import TokenDataset, check_local_index

log = logging.getLogger(__name__)


def token_streams(seq_streams: Sequence[int], cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(T,) stream index of every packed token; -1 for filler sequences past the documents."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    streams = torch.full((lengths.shape[0],), -1, dtype=torch.long)
    streams[: len(seq_streams)] = torch.tensor(seq_streams, dtype=torch.long)
    return torch.repeat_interleave(streams, lengths)


@dataclass(frozen=True)
class StreamSpec:
    """One source of a data mixture: MDS shards in `local` (or cached there from `remote`),
    weighted by exactly one of `proportion` (relative share of each epoch), `repeat` (times
    its own size) or `choose` (samples per epoch), or unweighted (all of it, once)."""

    name: str
    local: str
    remote: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None

    def unweighted(self) -> StreamSpec:
        return StreamSpec(self.name, self.local, self.remote)


def streaming_dataset(
    local: str | Path | None,
    remote: str | None = None,
    split: str | None = None,
    shuffle: bool = True,
    seed: int = 17,
    batch_size: int | None = None,
    streams: Sequence[StreamSpec] | None = None,
    **kwargs: Any,
) -> TokenDataset:
    """Open MDS shards: `local` alone for a local directory, or `remote` cached into `local`,
    or a mixture of `streams` (then `local`/`remote` are not used).

    `split` is a subdirectory ("train"/"val") of each. The shuffle is seeded (py1e by default).
    """
    sources = list(streams or [StreamSpec("shards", str(local), remote)])
    for spec in sources:
        if spec.remote is None:
            check_local_index(Path(spec.local) / split if split else Path(spec.local))
    if streams:
        from streaming import Stream

        mixture = [
            Stream(
                local=s.local,
                remote=s.remote,
                split=split,
                proportion=s.proportion,
                repeat=s.repeat,
                choose=s.choose,
            )
            for s in sources
        ]
        kwargs["streams"] = mixture
    else:
        kwargs.update(local=str(local), remote=remote, split=split)
    try:
        return TokenDataset(shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size, **kwargs)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - streaming raises many types for bad indexes
        where = ", ".join(f"{s.name}: {s.local}" for s in sources)
        raise DataError(f"cannot open MDS dataset ({where}, split {split}): {e}") from e


def padded_loader(
    dataset: StreamingDataset,
    batch_size: int,
    collator: PaddedMLMCollator,
    num_workers: int = 0,
) -> StreamingDataLoader:
    """A StreamingDataLoader of padded MLM batches; Composer checkpoints its dataset state."""
    return StreamingDataLoader(
        dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers
    )


def eval_share(num_samples: int) -> range:
    """This rank's sample ids of an evaluation split: one contiguous block per rank (so each
    rank reads few shards), every sample exactly once over all ranks, the blocks differing in
    length by at most one."""
    rank, world = rank_and_world()
    size, extra = divmod(num_samples, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


class SampleReader(torch.utils.data.Dataset):
    """Map-style view of the samples `ids` of a StreamingDataset (random access, in order)."""

    def __init__(self, dataset: StreamingDataset, ids: Sequence[int]) -> None:
        self.dataset, self.ids = dataset, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.ids[i])]


class BlankPadded(torch.utils.data.IterableDataset):
    """`eval_share` of a split, every rank's share made as long as the longest one with
    blank rows (a copy of a sample marked `blank`: the collator ignores its labels), so every
    rank evaluates the same number of padded batches. Iterable: each rank already holds its
    own share (Composer asks a map-style dataset for a DistributedSampler)."""

    def __init__(self, dataset: StreamingDataset) -> None:
        num = dataset.num_samples
        _, world = rank_and_world()
        self.share = SampleReader(dataset, eval_share(num))
        self.length = -(-num // world)  # ceil: the longest share

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self.share)):
            yield self.share[i]
        ids = self.share.ids
        for _ in range(self.length - len(self.share)):
            first = int(ids[0]) if len(ids) else 0  # a split smaller than the world
            yield {**self.share.dataset[first], "blank": True}


def padded_eval_loader(
    dataset: StreamingDataset, batch_size: int, collator: PaddedMLMCollator
) -> torch.utils.data.DataLoader:
    """Padded MLM batches of an evaluation split: every document exactly once over all ranks,
    the same number of batches on each (`BlankPadded`)."""
    return torch.utils.data.DataLoader(
        BlankPadded(dataset), batch_size=batch_size, collate_fn=collator
    )


class ComposerStateAdapter:
    """What Composer sees as `dataloader.dataset`: its `state_dict(num_samples, from_beginning)`
    and `load_state_dict` calls go to `owner`'s own state methods (the sample count Composer
    passes is ignored: packed and step batches hold no fixed number of documents). Any other
    attribute is looked up on `fallback` (the underlying StreamingDataset), when given."""

    def __init__(self, owner: Any, fallback: Any = None) -> None:
        self._owner = owner
        self._fallback = fallback

    def state_dict(self, num_samples: int = 0, from_beginning: bool = True) -> dict[str, Any]:
        return self._owner.state_dict()

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        self._owner.load_state_dict(obj)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or self._fallback is None:  # also while unpickling
            raise AttributeError(name)
        return getattr(self._fallback, name)


class PackedMLMLoader:
    """Iterate packed, masked microbatches:
    `{"input_ids", "cu_seqlens", "max_seqlen", "labels", "label_positions"}`.

    `input_ids` and `labels` are (total_tokens,) int64, `cu_seqlens` (num_seqs + 1,) int32,
    `max_seqlen` a python int and `label_positions` (M,) int64 the indices of the labelled
    tokens; see `flexbert.data.packing` for the layout. With `stream_ids`, also `stream_ids`
    (total_tokens,): each token's source stream (for per-stream evaluation of a mixture). The
    packing efficiency of everything yielded so far is `self.efficiency`. With
    `finish_every_rank` (evaluation) the epoch ends when every rank's documents are done, a
    rank that finished first yielding `empty_batch()`s until then.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        micro_batch_size: int,
        max_seq_len: int,
        masker: MLMMasker,
        pad_token_id: int,
        buffer_size: int = 512,
        pad_to_capacity: bool = False,
        seed: int = 17,
        prefetch: int = 2,
        num_workers: int = 0,
        read_batch_size: int | None = None,
        fixed_masks: bool = False,
        stream_ids: bool = False,
        finish_every_rank: bool = False,
    ) -> None:
        # Streaming partitions samples by its batch_size; the reading DataLoader must match it.
        if dataset.batch_size is None:
            dataset.batch_size = read_batch_size or 64
        self.streaming_dataset = dataset
        self.dataset = ComposerStateAdapter(self, dataset)
        self.packer = SequencePacker(
            micro_batch_size, max_seq_len, pad_token_id, buffer_size, pad_to_capacity
        )
        self.masker = masker
        self.seed = seed
        self.fixed_masks = fixed_masks  # eval: every pass masks the same positions
        self.stream_ids = stream_ids  # per-token source stream, for per-stream evaluation
        self.finish_every_rank = finish_every_rank  # eval: no rank's documents left unread
        self.prefetch = prefetch
        self.num_workers = num_workers
        self.read_batch_size = dataset.batch_size
        self._epoch = 0
        self._batches = 0  # batches yielded in this epoch
        self._last: dict[str, Any] = {"consumed": 0, "buffer": []}
        self._resume: dict[str, Any] | None = None
        self._started = False
        self._finished = False  # the epoch was read to its end (its state starts the next)

    @property
    def efficiency(self) -> float:
        """Non-pad fraction of the token slots over all batches packed so far."""
        return self.packer.efficiency

    def _documents(self) -> Iterator[tuple[int, np.ndarray]]:
        source: Any = self.streaming_dataset
        if self.finish_every_rank:  # evaluation: every document exactly once over all ranks
            source = SampleReader(source, eval_share(source.num_samples))
        reader = torch.utils.data.DataLoader(
            source,
            batch_size=self.read_batch_size,
            collate_fn=list,
            num_workers=self.num_workers,
        )
        for docs in reader:
            for d in docs:
                yield d["index"], d["input_ids"]

    def _batches_of_epoch(self, epoch: int, start: int, resume: dict | None) -> Iterator[Any]:
        buffer = []
        consumed = 0
        documents: Iterator[tuple[int, np.ndarray]] = self._documents()
        if resume is not None:
            consumed = resume["consumed"]
            # documents this rank read beyond the count the dataset resumed at
            documents = itertools.islice(documents, resume["skip"], None)
            for key, chunk in resume["buffer"]:
                ids = self.streaming_dataset[int(key)]["input_ids"]
                pieces = [
                    ids[i : i + self.packer.max_seq_len]
                    for i in range(0, len(ids), self.packer.max_seq_len)
                ]
                buffer.append((int(key), int(chunk), pieces[chunk]))
        for i, packed in enumerate(self.packer.pack(documents, buffer, consumed), start):
            yield self._finish(packed, epoch, i)

    def _finish(self, packed: PackedBatch, epoch: int, index: int) -> tuple[dict[str, Any], dict]:
        mask_epoch = 0 if self.fixed_masks else epoch
        generator = batch_generator(self.seed, mask_epoch, index, rank_and_world()[0])
        ids, labels = self.masker(packed.input_ids, generator)
        batch = {
            "input_ids": ids,
            "cu_seqlens": packed.cu_seqlens,
            "max_seqlen": packed.max_seqlen,
            "labels": labels,
            "label_positions": label_positions(labels),
        }
        if self.stream_ids:
            streams = [self.streaming_dataset.stream_of(int(key)) for key, _ in packed.keys]
            batch["stream_ids"] = token_streams(streams, packed.cu_seqlens)
        return batch, packed.state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        resume, self._resume = self._resume, None
        if resume is None:
            if self._started:  # a new epoch, whether or not the last one was read to the end
                self._epoch += 1
            self._batches = 0
            self._last = {"consumed": 0, "buffer": []}
        self._started, self._finished = True, False
        it: Any = self._batches_of_epoch(self._epoch, self._batches, resume)
        if self.prefetch > 0:
            it = Prefetcher(it, self.prefetch)
        try:
            done = False
            while True:
                item = None if done else next(it, None)  # a finished Prefetcher would block
                done = item is None
                if self.finish_every_rank:  # evaluation: on until the last rank is done
                    if not any_rank(not done):
                        self._finished = True
                        break
                    if done:
                        yield self.empty_batch()
                        continue
                elif not all_ranks(not done):  # one rank ran out: the epoch ends for all
                    self._finished = True
                    break
                batch, state = item
                self._batches += 1
                self._last = state
                yield batch
        finally:
            if isinstance(it, Prefetcher):
                it.close()

    def empty_batch(self) -> dict[str, Any]:
        """A batch that changes no metric: one pad token, no label (what a rank that has read
        all its documents yields while another rank still evaluates)."""
        labels = torch.full((1,), IGNORE_INDEX, dtype=torch.long)
        batch = {
            "input_ids": torch.full((1,), self.packer.pad_token_id, dtype=torch.long),
            "cu_seqlens": torch.tensor([0, 1], dtype=torch.int32),
            "max_seqlen": 1,
            "labels": labels,
            "label_positions": label_positions(labels),
        }
        if self.stream_ids:
            batch["stream_ids"] = torch.full((1,), -1, dtype=torch.long)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last yielded batch (small: ids, not tokens).
        With several ranks, every rank must call this together (it gathers their states)."""
        ranks = gather_objects({"consumed": self._last["consumed"], "buffer": self._last["buffer"]})
        common = min(r["consumed"] for r in ranks)  # read by every rank
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "finished": self._finished,
            "ranks": ranks,
            "dataset": self.streaming_dataset.state_dict(common * len(ranks), from_beginning=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration continues the saved epoch from the saved batch, or
        starts the next epoch when the saved one was read to its end (a checkpoint taken at
        an epoch boundary)."""
        if state.get("finished"):
            dataset = state["dataset"]
            self.streaming_dataset.load_state_dict(
                {**dataset, "epoch": int(dataset["epoch"]) + 1, "sample_in_epoch": 0}
            )
            self._epoch, self._batches = int(state["epoch"]) + 1, 0
            self._resume, self._started, self._finished = None, False, False
            self._last = {"consumed": 0, "buffer": []}
            return
        self.streaming_dataset.load_state_dict(state["dataset"])
        self._epoch = int(state["epoch"])
        self._batches = int(state["batches"])
        self._started, self._finished = True, False
        rank, world = rank_and_world()
        ranks = state.get("ranks") or [  # a single-rank state of an earlier release
            {"consumed": state["dataset"]["sample_in_epoch"], "buffer": state["buffer"]}
        ]
        per_rank = state["dataset"]["sample_in_epoch"] // world  # where this rank's reads resume
        if len(ranks) == world:
            mine = ranks[rank]
            self._resume = {
                "consumed": mine["consumed"],
                "skip": mine["consumed"] - per_rank,
                "buffer": mine["buffer"],
            }
            self._last = {"consumed": mine["consumed"], "buffer": mine["buffer"]}  # if saved again
            return
        waiting = sum(len(r["buffer"]) for r in ranks)
        log.warning(
            "resuming on %d ranks from a state of %d: the dataset continues at its shared count; "
            "%d buffered document pieces and each rank's extra reads are skipped",
            world,
            len(ranks),
            waiting,
        )
        self._resume = {"consumed": per_rank, "skip": 0, "buffer": []}
        self._last = {"consumed": per_rank, "buffer": []}
