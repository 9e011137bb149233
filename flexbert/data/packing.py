"""Greedy best-fit sequence packing into unpadded microbatches, with background prefetch.

A microbatch has `micro_batch_size` rows of `max_seq_len` token slots. Documents wait in a
buffer sorted by length; each row is filled by repeatedly taking the longest buffered document
that still fits (best-fit decreasing). With a buffer of a few hundred web-like documents this
leaves under 1% of the slots empty.

Output layout (what `FlexBertForMaskedLM(input_ids=..., cu_seqlens=..., max_seqlen=...)` takes):
- `input_ids`: (total_tokens,) int64, every packed document back to back, no padding;
- `cu_seqlens`: (num_seqs + 1,) int32 offsets of each document, `cu_seqlens[-1] == total_tokens`;
- `max_seqlen`: python int, the longest document, computed here on the host so the model never
  syncs with the device to find it.
With `pad_to_capacity=True` the batch instead always holds exactly micro_batch_size * max_seq_len
tokens (static shapes for torch.compile): the unused slots are appended as trailing pad
"sequences" of at most max_seq_len tokens each, listed in cu_seqlens like any other sequence.
"""

from __future__ import annotations

import bisect
import itertools
import queue
import threading
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flexbert.data.errors import DataError


@dataclass
class PackedBatch:
    """One packed microbatch plus the bookkeeping needed for metrics and resumption."""

    input_ids: torch.Tensor  # (total_tokens,) int64
    cu_seqlens: torch.Tensor  # (num_seqs + 1,) int32
    max_seqlen: int
    num_tokens: int  # real (non-pad) tokens
    capacity: int  # micro_batch_size * max_seq_len
    keys: list[tuple[Hashable, int]] = field(default_factory=list)  # (document key, chunk index)
    row_lengths: list[list[int]] = field(default_factory=list)  # document lengths in each row
    state: dict[str, Any] = field(default_factory=dict)  # packer state right after this batch

    @property
    def efficiency(self) -> float:
        """Fraction of the slots holding real tokens."""
        return self.num_tokens / self.capacity


def split_into_chunks(ids: np.ndarray, max_seq_len: int) -> list[np.ndarray]:
    """Cut a document longer than a row into row-sized pieces so no token is dropped."""
    return [ids[i : i + max_seq_len] for i in range(0, len(ids), max_seq_len)]


class SequencePacker:
    """Best-fit-decreasing packer over a stream of `(key, token_ids)` documents.

    Keys identify documents for resumption: `state` lists the keys still waiting in the buffer
    and how many documents were taken from the source, which is enough to rebuild the buffer.
    """

    def __init__(
        self,
        micro_batch_size: int,
        max_seq_len: int,
        pad_token_id: int,
        buffer_size: int = 512,
        pad_to_capacity: bool = False,
    ) -> None:
        if micro_batch_size < 1 or max_seq_len < 1:
            raise DataError(
                f"micro_batch_size and max_seq_len must be >= 1, got {micro_batch_size}, {max_seq_len}"
            )
        self.micro_batch_size = micro_batch_size
        self.max_seq_len = max_seq_len
        self.pad_token_id = pad_token_id
        self.buffer_size = max(buffer_size, micro_batch_size)
        self.pad_to_capacity = pad_to_capacity
        self.total_tokens = 0
        self.total_capacity = 0

    @property
    def efficiency(self) -> float:
        """Real tokens / slots over every batch packed so far (1.0 before the first)."""
        return self.total_tokens / self.total_capacity if self.total_capacity else 1.0

    def pack(
        self,
        documents: Iterable[tuple[Hashable, Any]],
        buffer: Iterable[tuple[Hashable, int, Any]] = (),
        consumed: int = 0,
    ) -> Iterator[PackedBatch]:
        """Yield packed batches until the documents run out (the last may be partly empty).

        `buffer` and `consumed` restore a state: documents that were waiting, as
        `(key, chunk_index, chunk_ids)`, and the count already taken from the source.
        """
        order: list[tuple[int, int]] = []  # sorted (length, -arrival): oldest wins ties
        items: list[tuple[Hashable, int, np.ndarray]] = []
        arrival = itertools.count()

        def add(key: Hashable, chunk: int, ids: np.ndarray) -> None:
            entry = (len(ids), -next(arrival))
            pos = bisect.bisect_left(order, entry)
            order.insert(pos, entry)
            items.insert(pos, (key, chunk, ids))

        for key, chunk, ids in buffer:
            add(key, chunk, np.asarray(ids))
        source = iter(documents)
        exhausted = False
        while True:
            while not exhausted and len(items) < self.buffer_size:
                try:
                    key, ids = next(source)
                except StopIteration:
                    exhausted = True
                    break
                consumed += 1
                for c, piece in enumerate(split_into_chunks(np.asarray(ids), self.max_seq_len)):
                    if len(piece):
                        add(key, c, piece)
            if not items:
                return
            rows: list[list[tuple[Hashable, int, np.ndarray]]] = []
            for _ in range(self.micro_batch_size):
                row, room = [], self.max_seq_len
                while items:
                    pos = bisect.bisect_right(order, (room, 1)) - 1
                    if pos < 0:
                        break
                    order.pop(pos)
                    row.append(items.pop(pos))
                    room -= len(row[-1][2])
                rows.append(row)
            waiting = sorted(range(len(order)), key=lambda i: -order[i][1])  # arrival order
            state = {"consumed": consumed, "buffer": [[items[i][0], items[i][1]] for i in waiting]}
            yield self._assemble(rows, state)

    def _assemble(
        self, rows: list[list[tuple[Hashable, int, np.ndarray]]], state: dict
    ) -> PackedBatch:
        seqs = [ids for row in rows for _, _, ids in row]
        lengths = [len(s) for s in seqs]
        num_tokens = sum(lengths)
        capacity = self.micro_batch_size * self.max_seq_len
        if self.pad_to_capacity and num_tokens < capacity:
            free = capacity - num_tokens
            pads = [self.max_seq_len] * (free // self.max_seq_len)
            if free % self.max_seq_len:
                pads.append(free % self.max_seq_len)
            seqs = seqs + [np.full(n, self.pad_token_id, dtype=np.int64) for n in pads]
            lengths = lengths + pads
        flat = np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, np.int64)
        cu = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        self.total_tokens += num_tokens
        self.total_capacity += capacity
        return PackedBatch(
            input_ids=torch.from_numpy(flat),
            cu_seqlens=torch.from_numpy(cu),
            max_seqlen=max(lengths, default=0),
            num_tokens=num_tokens,
            capacity=capacity,
            keys=[(k, c) for row in rows for k, c, _ in row],
            row_lengths=[[len(ids) for _, _, ids in row] for row in rows],
            state=state,
        )


_DONE = object()


class Prefetcher:
    """Run an iterator in a background thread, `depth` items ahead, re-raising its errors here.

    Packing and masking are host work; overlapping them with the training step keeps the GPU
    fed. Closing (or garbage-collecting) the prefetcher stops the thread.
    """

    def __init__(self, iterable: Iterable[Any], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stop the background thread (it may be blocked on a full queue)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __del__(self) -> None:
        self._stop.set()
