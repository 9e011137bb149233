"""Timed passes with peak memory, and the isolated maximum-batch-size search.

A pass is a callable that processes a whole document set; it is warmed up, then repeated,
with the device synchronised around every measurement so GPU time is not hidden by async
launches. Peak memory is torch.cuda.max_memory_allocated on a GPU and the resident-set growth
on the CPU (Linux; None where the kernel cannot reset the peak).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 1024**3


@dataclass
class Timing:
    seconds: list[float]  # one entry per timed pass
    peak_mem_gib: float | None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> dict[str, float]:
        """min, max and the inter-quartile range of the pass times."""
        s = sorted(self.seconds)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return {"seconds_min": s[0], "seconds_max": s[-1], "seconds_iqr": q3 - q1}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    """Drop cached blocks so one measurement does not inherit another's allocations."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory of the code inside the `with` block, in GiB (None if unmeasurable)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.gib: float | None = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            self._start = _rss_bytes() if _reset_rss_peak() else -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            self.gib = torch.cuda.max_memory_allocated() / GIB
        elif self._start >= 0:
            peak = _status_kib("VmHWM")
            self.gib = None if peak is None else max(0, peak * 1024 - self._start) / GIB


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return -1 if kib is None else kib * 1024


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def time_passes(
    run_pass: Callable[[], object], device: str, warmup: int = 1, repeats: int = 3
) -> Timing:
    """Warm up, then time `repeats` passes; peak memory covers the timed passes."""
    return time_interleaved([run_pass], device, warmup, repeats)[0]


def time_interleaved(
    passes: list[Callable[[], object]], device: str, warmup: int = 1, repeats: int = 3
) -> list[Timing]:
    """Time several passes round-robin: repeat r of every pass runs before repeat r + 1.

    On a shared or throttling machine, load that comes and goes then slows every model
    alike, so their ratio stays meaningful even when the absolute numbers move.
    """
    for run_pass in passes:
        for _ in range(warmup):
            run_pass()
    synchronize(device)
    seconds: list[list[float]] = [[] for _ in passes]
    peaks: list[list[float | None]] = [[] for _ in passes]
    for _ in range(max(1, repeats)):
        for i, run_pass in enumerate(passes):
            with PeakMemory(device) as mem:
                synchronize(device)
                start = time.perf_counter()
                run_pass()
                synchronize(device)
                seconds[i].append(time.perf_counter() - start)
            peaks[i].append(mem.gib)
    return [Timing(s, _max_or_none(p)) for s, p in zip(seconds, peaks)]


def _max_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


# ---------------------------------------------------------------- max batch size
# Near the memory limit a failed allocation does not always arrive as torch.OutOfMemoryError:
# cuBLAS/cuDNN workspaces and kernel launches report it as a RuntimeError with these words.
OOM_WORDS = ("out of memory", "ALLOC_FAILED", "invalid configuration argument")


def is_out_of_memory(err: BaseException) -> bool:
    """An out-of-memory, whichever library raised it."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(w in str(err) for w in OOM_WORDS)
    )


def fits(attempt: Callable[[], object], device: str) -> bool:
    """Run one attempt; an out-of-memory is a clean `False`, with memory freed afterwards.

    The exception (and the frames holding its tensors) is released before freeing, so one
    failed attempt never leaves memory behind for the next. Other errors propagate.
    """
    ok = True
    try:
        attempt()
        synchronize(device)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(err):
            raise
        if not isinstance(err, torch.OutOfMemoryError):  # a library's words for it: say which
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            print(
                f"max batch: counted as not fitting: {type(err).__name__}: {first}", file=sys.stderr
            )
        ok = False
    if not ok:
        gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return ok


@dataclass
class BatchSearch:
    """A max-batch search's answer: `size` fits; `bound` says why the true maximum may be
    larger ("" when the search pinned it down: size fits and the next size tried did not)."""

    size: int
    bound: str = ""  # "cap" | "time limit" | "resolution" (within `resolution` of it)


def max_batch_search(
    try_batch: Callable[[int], bool],
    cap: int,
    start: int = 1,
    resolution: float = 1 / 16,
    seconds: float | None = None,
    predict: Callable[[], int | None] | None = None,
) -> BatchSearch:
    """Largest batch size in [start, cap] for which `try_batch` succeeds (0 if none does).

    Doubles from `start` until a failure or the cap, then bisects between the last success
    and the first failure until they are within `resolution` of each other (0: exact); stops
    early, with what fits so far, after `seconds`. Assumes success is monotone in the size.

    `predict`, when given, is asked once `start` and `2 * start` fit for the size it expects
    to be the largest (e.g. `predicted_max_batch` from peak memory); the search tries that
    size first and steps away from it (by `resolution` of it, the step doubling) until it
    brackets the threshold. A good prediction needs two or three large attempts instead of a
    dozen; a poor one costs a few more, never a wrong answer.
    """
    deadline = None if seconds is None else time.perf_counter() + seconds

    def out_of_time() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    if cap < start or not try_batch(start):
        return BatchSearch(0)
    good, bad = start, None  # the largest size that fit, the smallest that did not

    def attempt(size: int) -> bool:
        nonlocal good, bad
        if try_batch(size):
            good = size
            return True
        bad = size
        return False

    guess = None
    if predict is not None and good < cap and not out_of_time() and attempt(min(2 * good, cap)):
        guess = predict()
    if guess is not None and good < guess and good < cap and not out_of_time():
        step = max(1, int(min(guess, cap) * resolution))
        if attempt(min(guess, cap)):
            while good < cap:
                if out_of_time():
                    return BatchSearch(good, "time limit")
                if not attempt(min(good + step, cap)):
                    break
                step *= 2
        else:
            while bad - step > good:
                if out_of_time():
                    return BatchSearch(good, "time limit")
                if attempt(bad - step):
                    break
                step *= 2
    while bad is None and good < cap:
        if out_of_time():
            return BatchSearch(good, "time limit")
        attempt(min(2 * good, cap))
    if bad is None:
        return BatchSearch(good, "cap")
    while bad - good > max(1, int(good * resolution)):
        if out_of_time():
            return BatchSearch(good, "time limit")
        attempt((good + bad) // 2)
    return BatchSearch(good, "" if bad - good == 1 else "resolution")


def predicted_max_batch(
    peaks: Mapping[int, float], available: float, margin: float = 0.95
) -> int | None:
    """The batch size whose peak memory would reach `margin` of `available` bytes, from the
    peaks measured at the two largest sizes in `peaks` (inference memory grows linearly with
    the batch: weights, then activations per row). None with fewer than two sizes or no
    growth between them."""
    if len(peaks) < 2:
        return None
    (n1, p1), (n2, p2) = sorted(peaks.items())[-2:]
    per_row = (p2 - p1) / (n2 - n1)
    if per_row <= 0:
        return None
    return max(n2, int(n2 + (margin * available - p2) / per_row))


def cuda_memory_available() -> int:
    """Bytes this process's allocator could hold at its peak now: the device's free memory
    plus what the allocator already reserves (the weights, among others)."""
    free, _total = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved()
