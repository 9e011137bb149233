"""Ending the life of mosaicml-streaming datasets inside a long-lived process.

A `StreamingDataset` keeps its state in named shared memory, through
`streaming.base.shared.SharedMemory` wrappers that register their own `cleanup` with `atexit`.
Until the process exits, `atexit` therefore keeps every wrapper, its file descriptor and its
/dev/shm file alive, including the ones opened only to look at other datasets' names (each new
dataset walks the names of all earlier ones, so the count grows faster than the number of
runs). A run that ends mid-epoch also leaves the dataset's prepare/ready threads waiting.
A test session or notebook that trains many times ran out of file descriptors.

Each epoch's iterator is likewise kept, with the epoch's sample ids, by a
`threading._register_atexit` entry.

`streaming_scope()` ends all of that for the datasets FlexBERT opened (`track`) inside it, as
a run ends (`flexbert.train.pretrain.train`): it stops their threads, closes every streaming
shared-memory handle that no other live dataset holds, unlinks the files those datasets
created, and drops the matching exit entries. Datasets opened before the scope (a notebook's
own, another run's) and datasets FlexBERT did not open keep working.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import weakref
from collections.abc import Iterator
from typing import Any

# Every dataset FlexBERT opened that is not stopped yet, with its opening number.
_OPEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_opened = 0  # datasets opened so far; the next one's number
_scanned_at = -1  # `_opened` at the last heap scan: none since means no new handles


def track(dataset: Any) -> None:
    """Register a freshly opened StreamingDataset for `stop_streaming`."""
    global _opened
    _OPEN[dataset] = _opened
    _opened += 1


@contextlib.contextmanager
def streaming_scope() -> Iterator[None]:
    """Stop, when the block ends (normally or by an error), every dataset FlexBERT opened
    inside it, and release their shared memory."""
    first = _opened
    try:
        yield
    finally:
        stop_streaming(opened_from=first)


def stop_streaming(opened_from: int = 0) -> int:
    """Stop the tracked datasets opened as number `opened_from` or later (all by default) and
    release the streaming shared memory that no other live dataset holds. Returns the number
    of shared-memory handles released."""
    global _scanned_at
    from streaming import StreamingDataset

    stopped = [d for d, number in list(_OPEN.items()) if number >= opened_from]
    for dataset in stopped:
        event = getattr(dataset, "_event", None)
        if event is not None:
            event.set()  # the prepare/ready threads exit at their next check
        _OPEN.pop(dataset, None)
    if not stopped and _scanned_at == _opened:  # no handle opened or freed since the last scan
        return 0
    _scanned_at = _opened
    stopped_ids = {id(d) for d in stopped}
    # one pass over the heap; type() rather than isinstance, which dead weak proxies refuse
    kind = _wrapper_type()
    others, wrappers = [], []
    for o in gc.get_objects():
        if issubclass(type(o), StreamingDataset) and id(o) not in stopped_ids:
            others.append(o)
        elif issubclass(type(o), kind):
            wrappers.append(o)
    _drop_iterator_exits(keep_iterators={id(getattr(d, "_iterator", None)) for d in others})
    keep = {id(w) for d in others for w in _wrappers_of(d)}
    released = 0
    for wrapper in wrappers:
        if id(wrapper) not in keep:
            _release(wrapper)
            released += 1
    return released


def _drop_iterator_exits(keep_iterators: set[int]) -> None:
    """Each epoch's iterator registers its exit with `threading._register_atexit`, which keeps
    the iterator (and the epoch's sample ids) until the process exits. Signal the iterators
    of the stopped datasets to exit and drop those entries."""
    import threading

    entries = getattr(threading, "_threading_atexits", None)
    if entries is None:  # a Python without the private hook: nothing was registered there
        return
    for entry in list(entries):
        iterator = getattr(getattr(entry, "func", None), "__self__", None)
        if type(iterator).__name__ != "_Iterator" or id(iterator) in keep_iterators:
            continue
        entry()  # non_blocking_exit: its prepare/ready threads stop at their next check
        entries.remove(entry)


def _wrapper_type() -> type:
    from streaming.base.shared.memory import SharedMemory

    return SharedMemory


def _wrappers_of(dataset: Any) -> list[Any]:
    """The shared-memory wrappers a dataset holds: directly, or inside its SharedArray,
    SharedScalar and SharedBarrier attributes (at most three attributes deep)."""
    kind, found, seen = _wrapper_type(), [], set()

    def visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, kind):
            found.append(obj)
            return
        if depth and not type(obj).__module__.startswith("streaming."):
            return  # only streaming's own containers hold its shared memory
        for value in getattr(obj, "__dict__", {}).values():
            visit(value, depth + 1)

    visit(dataset, 0)
    return found


def _release(wrapper: Any) -> None:
    """Close one wrapper's handles (unlinking the files it created) and drop its atexit
    entry. A buffer still viewed by a live array is left open for the garbage collector."""
    for shm in getattr(wrapper, "created_shms", []):
        with contextlib.suppress(BufferError, OSError):
            shm.close()
        with contextlib.suppress(OSError):  # already gone: another process cleaned it
            shm.unlink()
    for shm in getattr(wrapper, "opened_shms", []):
        with contextlib.suppress(BufferError, OSError):
            shm.close()
    wrapper.created_shms, wrapper.opened_shms = [], []
    atexit.unregister(wrapper.cleanup)
