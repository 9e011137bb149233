"""`flexbert-bench`: FlexBERT against Hugging Face ModernBERT and BERT, the paper's protocol.

    flexbert-bench                                  # GPU if present: base + large, all sets
    flexbert-bench --device cpu --tiny              # seconds on a laptop; FlexBERT/HF ratios
    PYTHONPATH=. python -m flexbert.bench.cli ...   # a bare GPU box, nothing installed

Writes results.json (rewritten after every row), results.txt (the table) and results.png into
--out. Comma lists take one value for every set or "short,long".
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
from pathlib import Path

import torch

from flexbert.bench import report, runners, suite, targets, workloads

DEFAULTS = {  # device kind -> (num docs, batch docs, max-batch cap) as (short, long)
    "cuda": {"num_docs": "1024,64", "batch_size": "256,16", "max_batch_search": "0"},
    "cpu": {"num_docs": "16,2", "batch_size": "8,1", "max_batch_search": "0"},
    "tiny": {"num_docs": "64,16", "batch_size": "16,4", "max_batch_search": "0"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flexbert-bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (default: cuda if any)")
    p.add_argument("--models", default="flexbert,hf-modernbert,bert", help="comma list")
    p.add_argument("--sizes", default=None, help="base,large (default: GPU both, CPU base)")
    p.add_argument("--tiny", action="store_true", help="tiny preset, 128/512-token sets")
    p.add_argument(
        "--backends",
        default=None,
        help="FlexBERT backends, each with optional +compile / +bf16rope / +cudagraph "
        "(e.g. varlen,varlen+compile+bf16rope; default: per device)",
    )
    p.add_argument("--workloads", default=",".join(workloads.WORKLOAD_KEYS), help="or 'none'")
    p.add_argument("--short-len", type=int, default=None, help="short set length (512)")
    p.add_argument("--long-len", type=int, default=None, help="long set length (8192)")
    p.add_argument("--num-docs", default=None, help="documents per set: N or short,long")
    p.add_argument("--batch-size", default=None, help="documents per batch: N or short,long")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument(
        "--max-batch-search", default=None, help="cap for the fixed sets (0 = off): N or s,l"
    )
    p.add_argument("--train-steps", type=int, default=None, help="timed MLM steps (0 = off)")
    p.add_argument("--train-rows", type=int, default=None, help="packed rows per step (32)")
    p.add_argument("--train-len", type=int, default=None, help="tokens per packed row (1024)")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd FlexBERT rows")
    p.add_argument(
        "--max-batch-only", action="store_true", help="only the max-batch search (fixed sets)"
    )
    p.add_argument(
        "--max-batch-seconds",
        type=float,
        default=None,
        help="time limit per max-batch search; then what fits so far, reported as >=N",
    )
    p.add_argument("--out", default="bench_out", help="output directory")
    p.add_argument("--append", action="store_true", help="keep rows of an existing results.json")
    p.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time all models round-robin per set (default: on for CPU, off for GPU)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def pair(value: str, name: str) -> dict[bool, int]:
    """'N' or 'short,long' -> {False: short, True: long} (keyed by Workload.long)."""
    try:
        parts = [int(v) for v in value.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 0:
        raise SystemExit(f"--{name}: expected N or SHORT,LONG (non-negative), got {value!r}")
    return {False: parts[0], True: parts[-1]}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def build_settings(args: argparse.Namespace) -> suite.Settings:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = "tiny" if args.tiny else ("cuda" if cuda else "cpu")
    defaults = DEFAULTS[kind]
    sizes_arg = "tiny" if args.tiny else (args.sizes or ("base,large" if cuda else "base"))
    sizes = sizes_arg.split(",")
    short_len = args.short_len or (128 if args.tiny else 512)
    long_len = args.long_len or (512 if args.tiny else 8192)
    keys = [] if args.workloads == "none" else args.workloads.split(",")
    backends = args.backends.split(",") if args.backends else None
    specs = runners.model_specs(args.models.split(","), sizes, device, args.compile, backends)
    train_steps = args.train_steps if args.train_steps is not None else (10 if cuda else 2)
    env = {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": runners.transformers_version(),
    }
    return suite.Settings(
        device=device,
        sizes=sizes,
        specs=specs,
        workloads=[workloads.make_workload(k, short_len, long_len) for k in keys],
        num_docs=pair(args.num_docs or defaults["num_docs"], "num-docs"),
        batch_size=pair(args.batch_size or defaults["batch_size"], "batch-size"),
        max_batch_cap=pair(
            args.max_batch_search or defaults["max_batch_search"], "max-batch-search"
        ),
        warmup=args.warmup,
        repeats=args.repeats,
        train_steps=train_steps,
        train_rows=args.train_rows or (32 if cuda else 4),
        train_len=args.train_len or (256 if args.tiny else 1024 if cuda else 512),
        seed=args.seed,
        max_batch_only=args.max_batch_only,
        max_batch_seconds=args.max_batch_seconds,
        interleave=(not cuda) if args.interleave is None else args.interleave,
        env=env,
    )


def check_device(device: str) -> None:
    """`auto`, `cpu` or a CUDA device that is there; anything else is a clear error."""
    if device in ("auto", "cpu"):
        return
    if not device.startswith("cuda"):
        raise ValueError(f"--device {device}: expected cuda, cuda:N, cpu or auto")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_device(args.device)
        settings = build_settings(args)
    except (ValueError, SystemExit) as err:  # unknown model/workload, a bad N or S,L
        if isinstance(err, SystemExit) and not isinstance(err.code, str):
            raise
        message = err.code if isinstance(err, SystemExit) else err
        print(f"flexbert-bench: error: {message}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    rows = report.read_rows(json_path) if args.append else []
    meta = {
        "command": " ".join(["flexbert-bench", *(argv if argv is not None else sys.argv[1:])]),
        "device": settings.device,
        "sizes": settings.sizes,
        "num_docs": settings.num_docs[False],
        "num_docs_long": settings.num_docs[True],
        **settings.env,
    }
    if settings.env["transformers"] is None:
        print("note: transformers is not installed; Hugging Face rows are skipped")

    def on_row(row: report.Row) -> None:
        rows.append(row)
        report.write_json(json_path, meta, rows)
        tps = f"{row['tokens_per_s']:,.0f} tok/s" if row["tokens_per_s"] else row["status"]
        extra = f" max batch {row['max_batch_size']}" if row.get("max_batch_size") else ""
        note = f" ({row['note']})" if row.get("note") else ""
        sparse = " sparse" if row.get("sparse_prediction") else ""
        print(
            f"[bench] {row['model']} {row['variant']}{sparse} {row['mode']} {row['label']}: "
            f"{tps}{extra}{note}",
            flush=True,
        )

    print(f"[bench] device {settings.device}: {settings.env['device_name']}", flush=True)
    suite.run_inference(settings, on_row)
    if settings.train_steps > 0:
        suite.run_training(settings, on_row)
    table = report.format_table(rows) + "\n\n" + report.format_ratios(report.ratios(rows))
    device, device_name = targets.measured_on(rows, settings.device, settings.env["device_name"])
    checked = targets.format_markdown(targets.check(rows, device), device_name)
    print(table + "\n\n" + checked)
    (out / "results.txt").write_text(table + "\n")
    (out / "targets.md").write_text(checked + "\n")
    if not args.no_plot:
        png = report.plot(rows, out / "results.png")
        why = "no timed rows to plot"
        if importlib.util.find_spec("matplotlib") is None:
            why = "matplotlib is not installed"
        print(f"plot: {png}" if png else f"plot skipped ({why})")
    print(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
