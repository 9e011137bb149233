"""Corpus -> pre-tokenized mosaicml-streaming MDS shards (train/val), written atomically.

Layout of `out_dir`: `train/` and `val/` (each an MDS directory with index.json and shards) and
`manifest.json` (settings + counts). Each sample is one column, `input_ids`, stored as
`ndarray:uint16` when the vocabulary fits in 16 bits (else `ndarray:uint32`): exactly the
token ids, `[CLS] ... [SEP]` included, at most `max_length` long. Documents longer than that are
split into several samples (each with its own [CLS]/[SEP]) or truncated, never silently.
Everything is written into a hidden sibling directory and renamed into place at the end, so a
crashed run never leaves a directory that looks complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from flexbert.data.corpus import CorpusSpec, Document, split_of
from flexbert.data.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "flexbert-mds-v1"
SPLITS = ("train", "val")
OVERFLOW_MODES = ("split", "truncate")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (halves disk and I/O), uint32 otherwise."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def chunk_ids(
    ids: list[int], cls_id: int, sep_id: int, max_length: int, overflow: str
) -> list[list[int]]:
    """Wrap content ids in [CLS]/[SEP], splitting (or truncating) to at most max_length each."""
    if overflow not in OVERFLOW_MODES:
        raise DataError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    if max_length < 3:
        raise DataError(f"max_length must be >= 3 to hold [CLS] x [SEP], got {max_length}")
    body = max_length - 2
    pieces = [ids[i : i + body] for i in range(0, len(ids), body)]
    if overflow == "truncate":
        pieces = pieces[:1]
    return [[cls_id, *p, sep_id] for p in pieces]


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of a complete conversion, or None when there is none."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise DataError(f"{path}: corrupt manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    return manifest


def check_manifest_tokenizer(manifest: dict, tokenizer: Any, where: str | Path) -> None:
    """Shards must carry the ids of the run's tokenizer: another vocabulary size or other
    [CLS]/[SEP] ids is an error; the same ones from a differently serialised tokenizer only
    a warning (the merges may differ)."""
    settings = manifest.get("settings", {})
    ours = {
        "vocab_size": len(tokenizer),
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
    }
    theirs = {k: settings.get(k) for k in ours}
    if theirs != ours:
        raise DataError(
            f"{where} was prepared with another tokenizer ({theirs}) than this run's ({ours}); "
            f"set data.tokenizer.path to the tokenizer the shards were made with, or prepare "
            f"them again with `flexbert-data prepare ... --tokenizer <this run's tokenizer>`"
        )
    sha = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    if settings.get("tokenizer_sha256") not in (None, sha):
        log.warning("%s: prepared with a tokenizer of the same ids but another file", where)


def _settings(corpus: CorpusSpec, tokenizer: Any, **kwargs: Any) -> dict:
    tok_json = tokenizer.backend_tokenizer.to_str()
    return {
        "corpus": corpus.fingerprint(),
        "tokenizer_sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
        "vocab_size": len(tokenizer),
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "dtype": token_dtype(len(tokenizer)).name,
        **kwargs,
    }


def _batched(docs: Iterator[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _write(corpus: CorpusSpec, tokenizer: Any, tmp: Path, settings: dict, progress: bool) -> dict:
    from streaming import MDSWriter
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    dtype = token_dtype(settings["vocab_size"])
    columns = {"input_ids": f"ndarray:{dtype.name}"}
    cls_id, sep_id = settings["cls_token_id"], settings["sep_token_id"]
    counts = {
        s: {"documents": 0, "chunks": 0, "tokens": 0, "skipped": 0, "truncated": 0} for s in SPLITS
    }
    try:
        writers = {
            s: MDSWriter(
                out=str(tmp / s),
                columns=columns,
                compression=settings["compression"],
                size_limit=settings["size_limit"],
            )
            for s in SPLITS
        }
    except ValueError as e:  # streaming's words for a bad compression or size limit
        raise DataError(
            f"shard settings compression={settings['compression']!r}, size_limit="
            f"{settings['size_limit']!r}: {e} (e.g. compression zstd or null, size_limit "
            "'64mb' or a byte count)"
        ) from e
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)
    try:
        for batch in _batched(corpus.documents(), 256):
            encodings = backend.encode_batch([d.text for d in batch], add_special_tokens=False)
            for doc, enc in zip(batch, encodings):
                split = split_of(doc.id, settings["val_fraction"], settings["split_seed"])
                c = counts[split]
                if not enc.ids or not doc.text.strip():  # empty or whitespace-only
                    c["skipped"] += 1
                    continue
                chunks = chunk_ids(
                    enc.ids, cls_id, sep_id, settings["max_length"], settings["overflow"]
                )
                c["truncated"] += len(enc.ids) - sum(len(ch) - 2 for ch in chunks)
                c["documents"] += 1
                for ch in chunks:
                    writers[split].write({"input_ids": np.asarray(ch, dtype=dtype)})
                    c["chunks"] += 1
                    c["tokens"] += len(ch)
            bar.update(len(batch))
            bar.set_postfix(tokens=sum(c["tokens"] for c in counts.values()))
    finally:
        bar.close()
    for w in writers.values():
        w.finish()
    return counts


def prepare_mds(
    corpus: CorpusSpec | str,
    out_dir: str | Path,
    tokenizer: Any,
    *,
    max_length: int = 8192,
    val_fraction: float = 0.01,
    split_seed: int = 0,
    overflow: str = "split",
    compression: str | None = "zstd",
    size_limit: int | str = "64mb",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert a corpus to MDS shards; return the manifest (settings + per-split counts).

    Idempotent: when `out_dir` already holds a complete conversion with the same settings
    (input fingerprint included) it is kept and its manifest returned with "reused": True.
    A different conversion there is replaced only with `overwrite=True`. Processes that
    prepare the same conversion at once (one per node onto a shared filesystem) all return
    the first one finished; without `overwrite` it is never replaced under a reader.
    """
    if isinstance(corpus, str | Path):
        corpus = CorpusSpec(source=str(corpus))
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    chunk_ids([], 0, 0, max_length, overflow)  # validates max_length and overflow early
    settings = _settings(
        corpus,
        tokenizer,
        max_length=max_length,
        val_fraction=val_fraction,
        split_seed=split_seed,
        overflow=overflow,
        compression=compression,
        size_limit=size_limit,
    )
    out = Path(out_dir)
    try:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty directory (e.g. from mkdtemp) holds nothing to protect
    except FileNotFoundError:  # another process removed it meanwhile
        pass
    except OSError as err:  # another process filled it meanwhile: judged below
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if out.exists():
        existing = read_manifest(out)
        if existing is not None and existing["settings"] == settings and not overwrite:
            return {**existing, "reused": True}
        if not overwrite:
            what = "a different conversion" if existing else "other files"
            raise DataError(
                f"{out} already holds {what}; pass overwrite=True (flexbert-data prepare --overwrite) to replace it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        counts = _write(corpus, tokenizer, tmp, settings, progress)
        total = {k: sum(c[k] for c in counts.values()) for k in counts["train"]}
        manifest = {"format": FORMAT, "settings": settings, "counts": {**counts, "total": total}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists() and overwrite:
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out)
            except OSError as err:  # `out` appeared meanwhile: a non-empty one is not replaced
                theirs = read_manifest(out)
                if theirs is None or theirs["settings"] != settings:
                    what = "a different conversion" if theirs else "other files"
                    raise DataError(
                        f"{out}: another process wrote {what} there during this conversion; "
                        "pass overwrite=True (flexbert-data prepare --overwrite) to replace it"
                    ) from err
                # Another process (the local rank 0 of another node, on a shared filesystem)
                # finished the same conversion first; ranks may be reading it already, so it
                # stays and this copy goes (the shards are the same: same input and settings).
                return {**theirs, "reused": True}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        if not counts[split]["chunks"]:  # flexbert-train needs both
            log.warning(
                "%s: the %s split holds no documents (val_fraction=%s); training refuses it",
                out,
                split,
                settings["val_fraction"],
            )
    return {**manifest, "reused": False}
