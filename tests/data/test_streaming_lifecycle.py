"""stop_streaming ends what streaming datasets keep until the process exits."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import threading

from streaming import StreamingDataset

from flexbert.data.loader import streaming_dataset
from flexbert.data.streaming_lifecycle import stop_streaming, streaming_scope


def shm_fds() -> int:
    """Open file descriptors on shared memory (deleted files included)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own descriptor)
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/")
    return n


def shm_files() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def read_some(dataset, n: int = 3) -> list[int]:
    out = []
    for sample in dataset:
        out.append(int(sample["index"]) if "index" in sample else len(out))
        if len(out) == n:
            break
    return out


def test_stopped_datasets_release_their_shared_memory(mds_dir, tmp_path):
    stop_streaming()  # whatever earlier tests left
    fds, files = shm_fds(), shm_files()
    for i in range(3):  # each new dataset opens the names of the earlier ones too
        local = shutil.copytree(mds_dir, tmp_path / f"shards{i}")
        assert len(read_some(streaming_dataset(local, split="train", batch_size=4))) == 3
    assert shm_fds() > fds  # what the three datasets hold
    released = stop_streaming()
    assert released > 0
    assert shm_fds() <= fds
    assert shm_files() <= files  # the files they created are unlinked


def test_a_dataset_flexbert_did_not_open_keeps_working(mds_dir, tmp_path):
    stop_streaming()
    theirs = StreamingDataset(
        local=str(shutil.copytree(mds_dir, tmp_path / "theirs")), split="train", batch_size=4
    )
    first = read_some(theirs, 2)
    ours = streaming_dataset(
        shutil.copytree(mds_dir, tmp_path / "ours"), split="train", batch_size=4
    )
    read_some(ours)
    stop_streaming()
    # its shared memory (shard states, barrier, epoch counter) is still open and usable
    assert len(read_some(theirs, 2)) == 2 and len(first) == 2
    assert theirs.size > 0


def in_time(fn, seconds: float = 60.0):
    """fn() in a thread; fails instead of hanging when it does not return in time."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert out, f"did not return within {seconds} s"
    return out[0]


def test_a_scope_stops_only_the_datasets_opened_inside_it(mds_dir, tmp_path):
    """A run's end (streaming_scope) leaves the datasets opened before it working: one
    mid-epoch, one never iterated (a closed barrier would hang its first epoch)."""
    stop_streaming()

    def opened(name):
        local = shutil.copytree(mds_dir, tmp_path / name)
        return streaming_dataset(local, split="train", batch_size=4, shuffle=False)

    reading, waiting = opened("reading"), opened("waiting")
    total = reading.size
    samples = iter(reading)
    head = [next(samples)["index"] for _ in range(2)]
    fds = shm_fds()
    with streaming_scope():
        assert len(read_some(opened("run"))) == 3
    assert shm_fds() <= fds  # the run's dataset released its handles
    rest = in_time(lambda: [s["index"] for s in samples])
    assert sorted(head + rest) == list(range(total))  # the whole epoch, nothing cut short
    assert len(in_time(lambda: read_some(waiting))) == 3


def test_a_dataset_dropped_before_the_stop_is_released_too(mds_dir, tmp_path):
    stop_streaming()
    fds, files = shm_fds(), shm_files()
    dataset = streaming_dataset(
        shutil.copytree(mds_dir, tmp_path / "a"), split="train", batch_size=4
    )
    assert len([s for s in dataset]) == dataset.size  # a whole epoch: its threads end
    del dataset
    gc.collect()
    stop_streaming()
    assert shm_fds() <= fds and shm_files() <= files
