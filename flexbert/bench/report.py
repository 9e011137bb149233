"""Benchmark output: the console table, results.json, FlexBERT/HF ratios and a PNG plot.

One row per (model, variant, mode, workload). results.json is rewritten after every row, so a
run cut short by a timeout still leaves everything measured so far. matplotlib is optional.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

Row = dict[str, Any]
SCHEMA_VERSION = 1
ROW_KEYS = (
    "model",
    "family",
    "size",
    "backend",
    "compile",
    "variant",
    "mode",
    "workload",
    "label",
    "sparse_prediction",
    "num_docs",
    "tokens",
    "batch_size",
    "tokens_per_s",
    "seconds",
    "seconds_min",
    "seconds_max",
    "seconds_iqr",
    "repeats",
    "peak_mem_gib",
    "max_batch_size",
    "max_batch_bound",  # why the true maximum may be larger: cap, time limit, resolution
    "dtype",
    "device",
    "device_name",
    "torch",
    "transformers",
    "status",
    "note",
)


def make_row(**values: Any) -> Row:
    """A row with every schema key (missing ones None); unknown keys are a programming error."""
    unknown = set(values) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"unknown result keys {sorted(unknown)}")
    return {key: values.get(key) for key in ROW_KEYS}


def ratios(rows: list[Row]) -> list[Row]:
    """FlexBERT's best over HF ModernBERT's best per (size, mode, workload), where both ran.

    Max-batch results (from timed rows or `max-batch` rows) are compared per (size, workload).
    """
    best: dict[tuple, Row] = {}
    batch: dict[tuple, tuple[int, str | None]] = {}
    for row in rows:
        if row["status"] != "ok" or row["family"] not in ("flexbert", "hf-modernbert"):
            continue
        if row.get("max_batch_size"):
            key = (row["family"], row["size"], row["label"])
            found = (row["max_batch_size"], row.get("max_batch_bound"))
            batch[key] = max(batch.get(key, (0, None)), found, key=lambda f: f[0])
        if row.get("tokens_per_s") is None:
            continue
        key = (row["family"], row["size"], row["mode"], row["label"])
        if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = row
    out = []
    for (family, size, mode, label), flex in best.items():
        hf = best.get(("hf-modernbert", size, mode, label))
        if family != "flexbert" or hf is None:
            continue
        out.append(
            {
                "size": size,
                "mode": mode,
                "workload": label,
                "flexbert_variant": flex["variant"],
                "hf_variant": hf["variant"],
                "flexbert_tokens_per_s": flex["tokens_per_s"],
                "hf_tokens_per_s": hf["tokens_per_s"],
                "speed_ratio": flex["tokens_per_s"] / hf["tokens_per_s"],
            }
        )
    for (family, size, label), (flex_batch, flex_bound) in batch.items():
        hf_batch, hf_bound = batch.get(("hf-modernbert", size, label), (0, None))
        if family == "flexbert" and hf_batch:
            out.append(
                {
                    "size": size,
                    "mode": "max-batch",
                    "workload": label,
                    "flexbert_max_batch": flex_batch,
                    "hf_max_batch": hf_batch,
                    "max_batch_ratio": flex_batch / hf_batch,
                    # a lower bound where only FlexBERT's search stopped early (cap, time);
                    # unknown where HF's did
                    "flexbert_max_batch_bound": flex_bound,
                    "hf_max_batch_bound": hf_bound,
                }
            )
    return out


def batch_text(size: int | None, bound: str | None) -> str:
    """A max-batch figure: ">=N" when the search stopped at its cap or time limit."""
    if size is None:
        return "-"
    return f">={size}" if bound in ("cap", "time limit") else str(size)


def write_json(path: str | Path, meta: dict[str, Any], rows: list[Row]) -> Path:
    """Atomically (re)write results.json: meta, rows and the derived ratios."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA_VERSION, "meta": meta, "rows": rows, "ratios": ratios(rows)}
    return replace_json(path, doc)


def replace_json(path: Path, doc: dict[str, Any]) -> Path:
    """Write `doc` to a temporary file, then move it over `path`: a run killed mid-write
    leaves the previous version whole."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path


def read_rows(path: str | Path) -> list[Row]:
    path = Path(path)
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def format_table(rows: list[Row]) -> str:
    """Fixed-width console table, one line per row."""
    header = (
        f"{'model':<20} {'variant':<24} {'mode':<9} {'workload':<11} {'batch':>6} "
        f"{'tokens/s':>11} {'median s':>9} {'min-max s':>15} {'peak GiB':>8} {'maxB':>6}  status"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        variant = r["variant"] + (" sparse" if r.get("sparse_prediction") else "")
        span = (
            f"{r['seconds_min']:.3f}-{r['seconds_max']:.3f}"
            if r["seconds_min"] is not None
            else "-"
        )
        status = r["status"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(
            f"{r['model']:<20} {variant:<24} {r['mode']:<9} {r['label']:<11} "
            f"{_fmt(r['batch_size']):>6} {_fmt(r['tokens_per_s'], ',.0f'):>11} "
            f"{_fmt(r['seconds'], '.3f'):>9} {span:>15} {_fmt(r['peak_mem_gib'], '.2f'):>8} "
            f"{batch_text(r['max_batch_size'], r.get('max_batch_bound')):>6}  {status}"
        )
    return "\n".join(lines)


def format_ratios(entries: list[Row]) -> str:
    if not entries:
        return "no FlexBERT / HF ModernBERT pairs to compare"
    lines = ["FlexBERT / HF ModernBERT (best variant of each):"]
    for e in entries:
        head = f"  {e['size']:<6} {e['mode']:<9} {e['workload']:<11}"
        if e["mode"] == "max-batch":
            flex = batch_text(e["flexbert_max_batch"], e.get("flexbert_max_batch_bound"))
            hf = batch_text(e["hf_max_batch"], e.get("hf_max_batch_bound"))
            lines.append(f"{head} x{e['max_batch_ratio']:.2f} (max batch {flex} vs {hf})")
            continue
        lines.append(
            f"{head} x{e['speed_ratio']:.2f} "
            f"({e['flexbert_tokens_per_s']:,.0f} [{e['flexbert_variant']}] vs "
            f"{e['hf_tokens_per_s']:,.0f} [{e['hf_variant']}])"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: str | Path) -> Path | None:
    """Grouped bars of tokens/s per workload; None (and no file) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r.get("tokens_per_s")]
    if not ok:
        return None
    groups = list(dict.fromkeys(f"{r['mode']}\n{r['label']}" for r in ok))
    series = list(dict.fromkeys(_series(r) for r in ok))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    for i, name in enumerate(series):
        values = {f"{r['mode']}\n{r['label']}": r["tokens_per_s"] for r in ok if _series(r) == name}
        xs = [g + i * width for g, label in enumerate(groups) if label in values]
        ax.bar(xs, [values[label] for label in groups if label in values], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("tokens / s (real tokens)")
    ax.set_yscale("log")
    ax.set_title(f"flexbert-bench on {ok[0]['device_name']} ({ok[0]['dtype']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(row: Row) -> str:
    return f"{row['model']} {row['variant']}" + (" sparse" if row.get("sparse_prediction") else "")
