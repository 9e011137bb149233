"""What a folder of MDS shards holds: its manifest, sample lengths and a few decoded samples.

    flexbert-data inspect MDS_DIR [--split train] [--tokenizer TOK] [--samples 3] [--scan 10000]

For checking a conversion before spending GPU hours on it: the right tokenizer (vocab size,
[CLS]/[SEP] ids), the length distribution the packer will see, and text that reads right.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flexbert.data.loader import streaming_dataset
from flexbert.data.mds import read_manifest


def inspect_shards(
    mds_dir: str | Path,
    split: str = "train",
    tokenizer: Any = None,
    samples: int = 3,
    scan: int = 10_000,
    chars: int = 300,
) -> dict[str, Any]:
    """Manifest settings and counts, length statistics over the first `scan` samples of
    `split`, and the first `samples` samples (decoded when a tokenizer is given)."""
    manifest = read_manifest(mds_dir)
    index = Path(mds_dir) / split / "index.json"
    empty = index.exists() and not json.loads(index.read_text()).get("shards")
    ds: Any = [] if empty else streaming_dataset(mds_dir, split=split, shuffle=False)
    n = min(len(ds), scan)  # an empty split (streaming refuses to open one) has no samples
    lengths = np.array([len(ds[i]["input_ids"]) for i in range(n)], dtype=np.int64)
    shown = []
    for i in range(min(samples, len(ds))):
        ids = [int(t) for t in ds[i]["input_ids"]]
        entry: dict[str, Any] = {"index": i, "tokens": len(ids), "first_ids": ids[:12]}
        if tokenizer is not None:
            entry["text"] = tokenizer.decode(ids)[:chars]
        shown.append(entry)
    stats = {"samples": len(ds), "scanned": n}
    if n:
        stats |= {
            "tokens_scanned": int(lengths.sum()),
            "length_mean": round(float(lengths.mean()), 1),
            "length_p50": int(np.percentile(lengths, 50)),
            "length_p90": int(np.percentile(lengths, 90)),
            "length_max": int(lengths.max()),
        }
    settings = (manifest or {}).get("settings", {})
    keep = ("vocab_size", "cls_token_id", "sep_token_id", "max_length", "overflow", "dtype")
    return {
        "dir": str(mds_dir),
        "split": split,
        "settings": {k: settings[k] for k in keep if k in settings},
        "counts": (manifest or {}).get("counts", {}).get(split),
        "lengths": stats,
        "samples": shown,
    }
