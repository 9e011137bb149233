"""Numerical sanity before timing: are the fast paths computing the same thing?

Run first by scripts/gpu_bench.sh so a fast but wrong kernel is caught before its speed is
celebrated. For each config (tiny, base) in the benchmark dtype, with one set of weights:
- every attention backend that runs here against `eager` on padded input in the padded
  layout (the ground truth: no unpadding code shared with the backends it checks);
- packed (cu_seqlens) against padded input for every backend;
- the padded layout (`padding='padded'`, entries `<backend>/padded`) of sdpa and flex;
- MLM gradients of every backend against eager's (tiny, packed input);
- the fastest backend with RoPE in bf16 (the `+bf16rope` lever) against eager in fp32 RoPE;
- the fastest backend through CUDA graphs (the `+cudagraph` lever), replayed on new ids;
- the packed sparse MLM step with the loaders' label positions has no host sync (tiny);
- FlexBERT against Hugging Face ModernBERT loaded through `save_hf` (if transformers exists).
Differences are over real tokens of last_hidden_state. A check passes when the relative L2
error ||out - ref|| / ||ref|| is within REL_L2 (in bf16 a single max-abs difference over ~1M
values is a few ulps of the largest one either way: correct kernels would fail it by chance),
and the max-abs difference within MAX_TOL * max |reference|, which catches a few tokens gone
wrong. FlexAttention runs last (it compiles, slowly, on a fresh machine), on the tiny model
only; `--part fast` leaves it out and a later `--part slow` adds it to the same report.
Results go to gpu_checks.json, rewritten (atomically) after every check.

    PYTHONPATH=. python -m flexbert.bench.gpu_checks --out bench_out
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import flexbert
from flexbert.attention.backends import UNPADDED_ONLY, flash_attn_available, varlen_available
from flexbert.bench import runners, workloads
from flexbert.bench.report import replace_json

REL_L2 = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}
MAX_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 3e-2}
SLOW_BACKENDS = ("flex",)  # checked after everything else, tiny only
# RoPE's cos/sin rounded to bf16 (the `+bf16rope` lever) add ~4e-3 relative error to every
# rotated q and k on top of the bf16 model's own: that check allows 3x REL_L2 and MAX_TOL.
BF16_ROPE_SLACK = 3.0
PARTS = ("all", "fast", "slow")  # slow: the compiled backends (SLOW_BACKENDS)
LENGTHS = [37, 128, 200, 64, 420, 5]  # 420: base local layers take the chunked sdpa path


def sample_inputs(lengths: list[int], size: str, device: str) -> dict[str, Any]:
    """The same documents as a padded batch and as a packed one."""
    ids = runners.id_range([size])
    docs = workloads.make_documents(lengths, ids, seed=1)
    pad = flexbert.ModelConfig.preset(size).pad_token_id
    padded = workloads.padded_batch(docs, device, pad).kwargs
    packed = workloads.packed_batch(docs, device).kwargs
    return {"padded": padded, "packed": packed, "mask": padded["attention_mask"].bool()}


def compare(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, slack: float = 1.0
) -> dict[str, Any]:
    diff = out.float() - ref.float()
    scale = ref.float().abs().max().item()
    max_diff = diff.abs().max().item()
    rel_l2 = (diff.norm() / ref.float().norm().clamp_min(1e-12)).item()
    return {
        "max_abs_diff": max_diff,
        "mean_abs_diff": diff.abs().mean().item(),
        "rel_l2": rel_l2,
        "ref_max_abs": scale,
        "pass": bool(
            rel_l2 <= slack * REL_L2[dtype] and max_diff <= slack * MAX_TOL[dtype] * max(scale, 1.0)
        ),
    }


def backends_here(device: str, slow: bool = False) -> list[str]:
    """Backends to check: the ones the benchmark times, or (`slow`) the compiled ones (on
    the CPU flex runs uncompiled, forward only)."""
    if slow:
        return list(SLOW_BACKENDS)
    if not device.startswith("cuda"):
        return ["sdpa"]
    names = ["sdpa"]
    if varlen_available(local=True):
        names.append("varlen")
    if flash_attn_available():
        names.append("flash_attn")
    return names


def fastest_backend(device: str) -> str:
    """What `auto` runs here on packed input."""
    names = backends_here(device)
    return next((b for b in ("varlen", "flash_attn") if b in names), "sdpa")


def reference_config(size: str, **overrides: Any) -> flexbert.ModelConfig:
    """The ground truth: eager attention in the padded layout (no unpadding)."""
    return runners.flexbert_config(size, "eager", padding="padded", **overrides)


def check_backends(
    size: str, device: str, dtype: torch.dtype, slow: bool = False
) -> Iterator[dict[str, Any]]:
    """Every backend (packed and padded input) against eager on padded input, same weights;
    then, as `<backend>/padded`, those that run the padded layout, in it (padded input)."""
    torch.manual_seed(0)
    with torch.device(device):
        ref_model = flexbert.FlexBertModel(reference_config(size))
    ref_model = ref_model.to(dtype).eval()
    inputs = sample_inputs(LENGTHS, size, device)
    mask = inputs["mask"]
    with torch.inference_mode():
        ref = ref_model(**inputs["padded"]).last_hidden_state[mask]  # (T, D) real tokens
    names = backends_here(device, slow)
    runs = [(b, "unpadded") for b in names]
    runs += [(b, "padded") for b in names if b not in UNPADDED_ONLY]
    for backend, padding in runs:
        name = backend if padding == "unpadded" else f"{backend}/{padding}"
        entry: dict[str, Any] = {"check": "backend", "size": size, "backend": name}
        try:
            cfg = runners.flexbert_config(size, backend, padding=padding)
            with torch.device(device):
                model = flexbert.FlexBertModel(cfg)
            model.load_state_dict(ref_model.state_dict())
            model = model.to(dtype).eval()
            with torch.inference_mode():
                padded = model(**inputs["padded"]).last_hidden_state[mask]
                if padding == "unpadded":  # packed input needs the unpadded layout
                    packed = model(**inputs["packed"]).last_hidden_state  # (T, D)
                    entry["packed_vs_eager"] = compare(packed, ref, dtype)
            entry["padded_vs_eager"] = compare(padded, ref, dtype)
            if padding == "unpadded":
                entry["packed_vs_padded"] = compare(packed, padded, dtype)
            entry["pass"] = all(entry[k]["pass"] for k in entry if k.endswith("eager"))
        except Exception as err:  # report and go on: one broken kernel must not hide the rest
            entry.update({"pass": False, "error": f"{type(err).__name__}: {err}"[:300]})
        yield entry


def check_backward(size: str, device: str, slow: bool = False) -> Iterator[dict[str, Any]]:
    """MLM gradients (bf16 autocast on GPU, fp32 weights) of every backend against eager's.

    Compares the relative L2 error of one attention weight's gradient, packed input."""
    inputs = sample_inputs(LENGTHS, size, device)["packed"]
    labels = inputs["input_ids"].clone()
    labels[::3] = -100
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    grads: dict[str, torch.Tensor] = {}
    for backend in ["eager", *backends_here(device, slow)]:
        entry: dict[str, Any] = {"check": "backward", "size": size, "backend": backend}
        if backend == "flex" and not device.startswith("cuda"):
            yield {**entry, "pass": None, "skipped": "FlexAttention has no CPU backward"}
            continue
        try:
            torch.manual_seed(0)
            with torch.device(device):
                model = flexbert.FlexBertForMaskedLM(runners.flexbert_config(size, backend))
            with autocast:
                model(**inputs, labels=labels).loss.backward()
            grads[backend] = model.model.layers[1].attn.Wqkv.weight.grad.float()
            ref = grads["eager"]
            rel = ((grads[backend] - ref).norm() / ref.norm()).item()
            entry.update({"grad_rel_err": rel, "pass": rel < 5e-2})
        except Exception as err:
            entry.update({"pass": False, "error": f"{type(err).__name__}: {err}"[:300]})
        if backend != "eager":
            yield entry


def check_bf16_rope(size: str, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """The `+bf16rope` lever: fastest backend, RoPE in the activations' dtype, vs eager."""
    backend = fastest_backend(device)
    entry: dict[str, Any] = {"check": "bf16rope", "size": size, "backend": backend}
    try:
        torch.manual_seed(0)
        with torch.device(device):
            ref_model = flexbert.FlexBertModel(reference_config(size))
            rope = {"name": "rope", "fp32": False}
            model = flexbert.FlexBertModel(runners.flexbert_config(size, backend, position=rope))
        model.load_state_dict(ref_model.state_dict())
        ref_model, model = ref_model.to(dtype).eval(), model.to(dtype).eval()
        inputs = sample_inputs(LENGTHS, size, device)
        with torch.inference_mode():
            ref = ref_model(**inputs["padded"]).last_hidden_state[inputs["mask"]]
            ours = model(**inputs["packed"]).last_hidden_state
        entry.update(compare(ours, ref, dtype, slack=BF16_ROPE_SLACK), slack=BF16_ROPE_SLACK)
    except Exception as err:
        entry.update({"pass": False, "error": f"{type(err).__name__}: {err}"[:300]})
    return entry


def check_cuda_graph(size: str, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """The `+cudagraph` lever: a captured forward, replayed on new ids, against eager."""
    backend = fastest_backend(device)
    entry: dict[str, Any] = {"check": "cudagraph", "size": size, "backend": backend}
    if not device.startswith("cuda"):
        return {**entry, "pass": None, "skipped": "CUDA graphs need a CUDA device"}
    try:
        from flexbert.bench.cuda_graphs import GraphedForward

        torch.manual_seed(0)
        with torch.device(device):
            model = flexbert.FlexBertModel(runners.flexbert_config(size, backend))
        model = model.to(dtype).eval()
        graphed = GraphedForward(model)
        first = sample_inputs(LENGTHS, size, device)["packed"]
        ids = runners.id_range([size])
        second = {
            **first,
            "input_ids": torch.randint(*ids, first["input_ids"].shape, device=device),
        }
        with torch.inference_mode():
            captured = compare(
                graphed(**first).last_hidden_state, model(**first).last_hidden_state, dtype
            )
            replayed = graphed(**second).last_hidden_state  # same shape: a replay, new ids
            entry.update(compare(replayed, model(**second).last_hidden_state, dtype))
        entry["captured_vs_eager"] = captured
        entry["pass"] = entry["pass"] and captured["pass"] and len(graphed.graphs) == 1
    except Exception as err:
        entry.update({"pass": False, "error": f"{type(err).__name__}: {err}"[:300]})
    return entry


def check_host_syncs(size: str, device: str) -> dict[str, Any]:
    """The packed sparse MLM step (fastest backend, bf16 autocast on GPU) with the loaders'
    `label_positions`: its forward and loss never wait for the device. On CUDA torch's own
    sync check counts syncs (file:line of the Python caller); the op recorder names the ops
    (eager backends). The backward's syncs, inside torch's kernels, are counted as found; the
    forward without label_positions is counted too (its one sync shows the check sees)."""
    from flexbert.bench.host_syncs import HostSyncRecorder, cuda_sync_warnings

    backend = fastest_backend(device)
    entry: dict[str, Any] = {"check": "hostsync", "size": size, "backend": backend}
    cuda = device.startswith("cuda")
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = flexbert.FlexBertForMaskedLM(
                runners.flexbert_config(size, backend, sparse_prediction=True)
            )
        inputs = sample_inputs(LENGTHS, size, device)["packed"]
        labels = inputs["input_ids"].clone()
        labels[::3] = -100
        positions = (labels != -100).nonzero().flatten()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

        def forward(**extra: Any) -> torch.Tensor:
            with autocast:
                return model(**inputs, labels=labels, **extra).loss

        def syncs(name: str, fn: Callable[[], Any]) -> Any:
            """Run fn; store the ops the recorder saw, torch's CUDA sync warnings and the
            count (CUDA: torch's warnings, which see everything; else the recorder's ops)."""
            recorder = HostSyncRecorder()
            with contextlib.ExitStack() as stack:
                found = stack.enter_context(cuda_sync_warnings()) if cuda else []
                if backend != "flex":  # compiled: no dispatch mode allowed
                    stack.enter_context(recorder)
                result = fn()
            entry[f"{name}_ops"] = [f"{op} at {where}" for op, where in recorder.calls]
            entry[f"{name}_cuda_syncs"] = found
            entry[f"{name}_syncs"] = len(found) if cuda else len(recorder.calls)
            return result

        forward(label_positions=positions).backward()  # warm-up: lazy initialisation
        loss = syncs("forward", lambda: forward(label_positions=positions))
        syncs("backward", loss.backward)
        syncs("without_positions", forward)
        entry["pass"] = not (
            entry["forward_syncs"] or entry["forward_ops"] or entry["backward_ops"]
        )
    except Exception as err:
        entry.update({"pass": False, "error": f"{type(err).__name__}: {err}"[:300]})
    return entry


def check_hf_parity(size: str, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """FlexBERT (packed, fastest backend) vs transformers ModernBertModel with its weights."""
    entry: dict[str, Any] = {"check": "hf_parity", "size": size}
    if runners.transformers_version() is None:
        return {**entry, "pass": None, "skipped": "transformers is not installed"}
    from transformers import ModernBertModel

    backend = fastest_backend(device)
    entry["backend"] = backend
    try:
        torch.manual_seed(0)
        model = flexbert.FlexBertModel(runners.flexbert_config(size, backend))
        with tempfile.TemporaryDirectory() as tmp:
            model.save_hf(tmp)
            hf = ModernBertModel.from_pretrained(tmp, attn_implementation="sdpa")
        model = model.to(device, dtype).eval()
        hf = hf.to(device).eval()
        for p in hf.parameters():  # weights in dtype; RoPE's inv_freq buffers stay fp32
            p.data = p.data.to(dtype)
        inputs = sample_inputs(LENGTHS, size, device)
        with torch.inference_mode():
            ref = hf(**inputs["padded"]).last_hidden_state[inputs["mask"]]
            ours = model(**inputs["packed"]).last_hidden_state
        return {**entry, **compare(ours, ref, dtype)}
    except Exception as err:
        return {**entry, "pass": False, "error": f"{type(err).__name__}: {err}"[:300]}


def run_checks(
    sizes: list[str],
    device: str,
    dtype: torch.dtype,
    save: Callable[[dict[str, Any]], None] | None = None,
    part: str = "all",
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every check of `part` (all | fast | slow: the compiled backends); `save(report)` after
    each one, so a run cut short keeps what it found. `previous`: a report whose results this
    one continues (the fast part's, for the slow part)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    earlier = previous["results"] if previous else []
    report: dict[str, Any] = {
        "device": device,
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": runners.transformers_version(),
        "parts": [*(previous or {}).get("parts", []), part],
        "complete": False,
        "all_pass": all(r["pass"] is not False for r in earlier),
        "results": list(earlier),
    }

    def add(entries) -> None:
        for entry in entries:
            report["results"].append(entry)
            report["all_pass"] = report["all_pass"] and entry["pass"] is not False
            if save:
                save(report)

    for size in sizes if part != "slow" else []:
        add(check_backends(size, device, dtype))
        if size == "tiny":
            add(check_backward(size, device))
        add([check_bf16_rope(size, device, dtype)])
        add([check_cuda_graph(size, device, dtype)])
        if size == "tiny":
            add([check_host_syncs(size, device)])
        add([check_hf_parity(size, device, dtype)])
    slow = part != "fast" and "tiny" in sizes and backends_here(device, slow=True)
    if slow:  # last: they compile
        add(check_backends("tiny", device, dtype, slow=True))
        add(check_backward("tiny", device, slow=True))
    report["complete"] = True
    if save:
        save(report)
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    parts = "+".join(report.get("parts", ["all"]))
    lines = [f"gpu_checks on {report['device_name']} ({report['dtype']}, part {parts}):"]
    lines += [summary_line(r) for r in report["results"]]
    lines.append("all pass" if report["all_pass"] else "SOME CHECKS FAILED")
    return lines


def summary_line(r: dict[str, Any]) -> str:
    head = f"  {r['check']:<9} {r['size']:<5} {r.get('backend', ''):<11}"
    verdict = "ok" if r.get("pass") else "FAIL"
    if "error" in r or "skipped" in r:
        return f"{head} {r.get('error') or r.get('skipped')}"
    if r["check"] == "hostsync":
        return (
            f"{head} forward_syncs={r['forward_syncs']} backward_syncs={r['backward_syncs']}"
            f" (forward without label_positions: {r['without_positions_syncs']}) {verdict}"
        )
    if r["check"] == "backward":
        return f"{head} grad_rel_err={r['grad_rel_err']:.2e} {verdict}"
    if r["check"] == "backend":
        keys = [k for k in ("packed_vs_eager", "padded_vs_eager", "packed_vs_padded") if k in r]
        diffs = " ".join(f"{k}={r[k]['rel_l2']:.1e}/{r[k]['max_abs_diff']:.1e}" for k in keys)
        return f"{head} rel_l2/max_abs {diffs} {verdict}"
    return f"{head} rel_l2={r['rel_l2']:.1e} max_abs_diff={r['max_abs_diff']:.2e} {verdict}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_checks", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--sizes", default="tiny,base")
    p.add_argument("--dtype", default=None, help="bfloat16 on GPU, float32 on CPU by default")
    p.add_argument("--out", default="bench_out")
    p.add_argument(
        "--part",
        choices=PARTS,
        default="all",
        help="fast: all but the compiled backends (flex); slow: only those, added to the "
        "report --out holds",
    )
    args = p.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    default = "bfloat16" if device.startswith("cuda") else "float32"
    dtype = getattr(torch, args.dtype or default)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_checks.json"
    previous = None
    if args.part == "slow" and path.exists():
        previous = json.loads(path.read_text())

    def save(report: dict[str, Any]) -> None:
        replace_json(path, report)  # a run killed mid-write keeps the last one
        if not report["complete"]:  # progress: the check just finished
            print(summary_line(report["results"][-1]), flush=True)

    report = run_checks(args.sizes.split(","), device, dtype, save, args.part, previous)
    print("\n".join(summary_lines(report)))
    return 0 if report["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
