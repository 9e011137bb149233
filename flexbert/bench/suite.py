"""Runs the rows of a benchmark: every model on every workload, then training throughput.

Each row is isolated: an out-of-memory or any other failure becomes that row's status and the
run goes on. `on_row` is called after every row (the CLI rewrites results.json there).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flexbert.bench import runners, timing, workloads
from flexbert.bench.report import Row, make_row
from flexbert.bench.runners import ModelSpec
from flexbert.bench.train import make_step


@dataclass
class Settings:
    device: str
    sizes: list[str]
    specs: list[ModelSpec]
    workloads: list[workloads.Workload]
    num_docs: dict[bool, int]  # keyed by Workload.long
    batch_size: dict[bool, int]
    max_batch_cap: dict[bool, int]  # 0 = no search
    warmup: int = 1
    repeats: int = 3
    train_steps: int = 0
    train_rows: int = 32
    train_len: int = 1024
    seed: int = 0
    interleave: bool = False  # time all models round-robin (noisy CPUs)
    max_batch_only: bool = False  # skip timing: only the max-batch search on fixed sets
    max_batch_seconds: float | None = None  # per search; then what fits so far, as ">="
    env: dict[str, Any] = field(default_factory=dict)  # device_name, torch, transformers

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32


def _base(spec: ModelSpec, s: Settings, **values: Any) -> Row:
    return make_row(
        model=spec.name,
        family=spec.family,
        size=spec.size,
        backend=spec.backend,
        compile=spec.compile,
        variant=spec.variant,
        device=s.device,
        **{"repeats": s.repeats, **s.env, **values},
    )


def _failure(err: BaseException) -> tuple[str, str]:
    if isinstance(err, torch.OutOfMemoryError):
        return "oom", "out of memory"
    return "error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]


def run_inference(s: Settings, on_row: Callable[[Row], None]) -> None:
    """Time every (model, workload) pair and search the max batch on fixed sets.

    Sequential by default (one model resident at a time, so the max-batch search sees all the
    memory); with `s.interleave` all models are built first and timed round-robin per set.
    No set (`--workloads none`, a training-only run): nothing is built.
    """
    if not s.workloads:
        return
    ids = runners.id_range(s.sizes)
    docs = {
        w.key: workloads.make_documents(
            workloads.sample_lengths(w, s.num_docs[w.long], s.seed), ids, s.seed
        )
        for w in s.workloads
    }
    models: dict[ModelSpec, Any] = {}
    for spec in s.specs:
        model = _build_or_report(spec, s, docs, on_row)
        if model is None:
            continue
        if s.max_batch_only:
            for w in s.workloads:
                on_row(_max_batch_row(model, spec, w, docs[w.key], s, ids))
                timing.free_memory(s.device)
        elif s.interleave:
            models[spec] = model
            continue
        else:
            for w in s.workloads:
                on_row(_time_group({spec: model}, w, docs[w.key], s, ids)[0])
        del model
        timing.free_memory(s.device)
    if models:
        for w in s.workloads:
            for row in _time_group(models, w, docs[w.key], s, ids):
                on_row(row)


def _inference_row(spec: ModelSpec, w: workloads.Workload, docs: list, s: Settings) -> Row:
    return _base(
        spec,
        s,
        mode="inference",
        workload=w.key,
        label=w.label,
        num_docs=len(docs),
        batch_size=s.batch_size[w.long],
        dtype=str(s.dtype).removeprefix("torch."),
    )


def _build_or_report(spec: ModelSpec, s: Settings, docs: dict, on_row) -> Any:
    """The model, or None after reporting every one of its rows as skipped/failed."""
    status, note = None, None
    if runners.needs_transformers(spec) and s.env.get("transformers") is None:
        status, note = "skipped", "transformers is not installed"
    else:
        try:
            return runners.build_model(spec, s.device, s.dtype)
        except Exception as err:  # e.g. a backend that cannot run on this device
            status, note = _failure(err)
    for w in s.workloads:
        on_row({**_inference_row(spec, w, docs[w.key], s), "status": status, "note": note})
    return None


def _time_group(models: dict, w: workloads.Workload, docs: list, s: Settings, ids) -> list[Row]:
    """Rows for one set: the models that can take it are timed together (round-robin)."""
    rows, passes, runnable = {}, [], []
    for spec, model in models.items():
        rows[spec] = _inference_row(spec, w, docs, s)
        if w.max_len > runners.max_len(spec):
            note = f"max {runners.max_len(spec)} positions"
            rows[spec].update(status="skipped", note=note)
            continue
        pad = runners.special_ids(spec)["pad"]
        batches = workloads.make_batches(docs, s.batch_size[w.long], spec.layout, s.device, pad)
        rows[spec]["tokens"] = sum(b.num_tokens for b in batches)
        passes.append(_make_pass(model, batches))
        runnable.append(spec)
    try:
        results = timing.time_interleaved(passes, s.device, s.warmup, s.repeats) if passes else []
    except Exception as err:
        status, note = _failure(err)
        results = []
        for spec in runnable:
            rows[spec].update(status=status, note=note)
    del passes
    timing.free_memory(s.device)
    for spec, result in zip(runnable, results):
        row = rows[spec]
        row.update(
            tokens_per_s=row["tokens"] / result.median,
            seconds=result.median,
            peak_mem_gib=result.peak_mem_gib,
            status="ok",
            **result.spread(),
        )
        cap = s.max_batch_cap[w.long]
        if cap > 0 and not w.variable and spec.plain:
            pad = runners.special_ids(spec)["pad"]
            try:
                found = _max_batch(models[spec], spec, w, s, ids, pad, cap)
                row.update(max_batch_size=found.size, max_batch_bound=found.bound or None)
            except Exception as err:  # the timing stands; only the search failed
                row["note"] = "max-batch search: " + _failure(err)[1]
    return list(rows.values())


def _max_batch_row(model, spec: ModelSpec, w, docs: list, s: Settings, ids) -> Row:
    """A `max-batch` row: the search alone, on fixed sets only (no timing)."""
    row = {**_inference_row(spec, w, docs, s), "mode": "max-batch", "batch_size": None}
    cap = s.max_batch_cap[w.long]
    if w.variable or not spec.plain or cap <= 0:
        return {**row, "status": "skipped", "note": "fixed sets, no compile/cudagraph, cap > 0"}
    if w.max_len > runners.max_len(spec):
        return {**row, "status": "skipped", "note": f"max {runners.max_len(spec)} positions"}
    pad = runners.special_ids(spec)["pad"]
    try:
        found = _max_batch(model, spec, w, s, ids, pad, cap)
    except Exception as err:  # e.g. a sticky CUDA error: this row fails, the next ones run
        status, note = _failure(err)
        return {**row, "status": status, "note": note}
    bound = found.bound or None
    return {
        **row,
        "max_batch_size": found.size,
        "max_batch_bound": bound,
        "status": "ok",
        "note": f"cap {cap}",
    }


def _make_pass(model, batches: list[workloads.ModelBatch]) -> Callable[[], None]:
    def run_pass() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(**batch.kwargs)

    return run_pass


def _max_batch(model, spec, w, s: Settings, ids, pad: int, cap: int) -> timing.BatchSearch:
    """Largest batch of fixed-length documents one forward pass fits in memory. On a GPU the
    search starts from the size that peak memory at 1 and 2 documents predicts."""
    on_gpu = s.device.startswith("cuda")
    peaks: dict[int, float] = {}  # size -> peak bytes of a forward that fit (GPU only)

    def try_batch(size: int) -> bool:
        def attempt() -> None:
            docs = list(torch.randint(*ids, (size, w.max_len)).unbind(0))
            batch = workloads.make_batches(docs, size, spec.layout, s.device, pad)[0]
            with torch.inference_mode():
                model(**batch.kwargs)

        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        ok = timing.fits(attempt, s.device)
        if ok and on_gpu:
            peaks[size] = torch.cuda.max_memory_allocated()
        return ok

    def predict() -> int | None:
        return timing.predicted_max_batch(peaks, timing.cuda_memory_available())

    return timing.max_batch_search(
        try_batch, cap, seconds=s.max_batch_seconds, predict=predict if on_gpu else None
    )


def train_specs(s: Settings) -> list[tuple[ModelSpec, bool]]:
    """(model, sparse_prediction) pairs: the first backend of each family and option set,
    dense and sparse (BERT has no sparse prediction; CUDA graphs are for inference only)."""
    seen: set[tuple[str, str, bool, bool]] = set()
    out = []
    for spec in s.specs:
        key = (spec.family, spec.size, spec.compile, spec.bf16_rope)
        if key in seen or spec.backend == "flash_attention_2" or spec.cuda_graph:
            continue
        seen.add(key)
        out.append((spec, False))
        if spec.family != "bert":
            out.append((spec, True))
    return out


def run_training(s: Settings, on_row: Callable[[Row], None]) -> None:
    """MLM training throughput on packed rows for every model family in the run.

    Sequential by default; with `s.interleave` every model is built first and the steps are
    timed round-robin (CPU mode: fair under load, but GPU peak memory would mix models).
    """
    rows = workloads.training_rows(s.train_rows * 2, s.train_len, runners.id_range(s.sizes))
    dtype = "bf16-autocast" if s.device.startswith("cuda") else "float32"
    num_batches = min(s.train_steps + s.warmup, 8)
    steps: list[tuple[Row, Callable[[], None]]] = []
    for spec, sparse in train_specs(s):
        row = _base(
            spec,
            s,
            mode="train",
            workload="mlm",
            label=f"mlm-{s.train_len}",
            sparse_prediction=sparse,
            num_docs=s.train_rows,
            batch_size=s.train_rows,
            dtype=dtype,
            repeats=s.train_steps,
        )
        if runners.needs_transformers(spec) and s.env.get("transformers") is None:
            on_row({**row, "status": "skipped", "note": "transformers is not installed"})
            continue
        if s.train_len > runners.max_len(spec) and spec.family != "bert":
            on_row({**row, "status": "skipped", "note": "row longer than max_seq_len"})
            continue
        try:
            mask_id = runners.special_ids(spec)["mask"]
            step, tokens = make_step(
                spec, rows, s.train_rows, num_batches, s.device, mask_id, sparse
            )
            row["tokens"] = tokens
            steps.append((row, step))
            if not s.interleave:
                _time_steps(steps, s, on_row)
                steps = []
        except Exception as err:
            _report_failure(row, err, s, on_row)
    if steps:
        _time_steps(steps, s, on_row)


def _time_steps(steps: list[tuple[Row, Callable[[], None]]], s: Settings, on_row) -> None:
    try:
        results = timing.time_interleaved([f for _, f in steps], s.device, s.warmup, s.train_steps)
    except Exception as err:
        for row, _ in steps:
            _report_failure(row, err, s, on_row)
        return
    for (row, _), result in zip(steps, results):
        row.update(
            tokens_per_s=row["tokens"] / result.median,
            seconds=result.median,
            peak_mem_gib=result.peak_mem_gib,
            status="ok",
            **result.spread(),
        )
        on_row(row)
    steps.clear()
    timing.free_memory(s.device)


def _report_failure(row: Row, err: BaseException, s: Settings, on_row) -> None:
    row["status"], row["note"] = _failure(err)
    if row["status"] == "error":
        traceback.print_exc()
    timing.free_memory(s.device)
    on_row(row)
