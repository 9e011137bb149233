"""The `data` config node -> tokenizer, MDS shards and the train/eval loaders.

Tokenizers and shards built from a corpus are cached under `paths.cache_dir` in directories
named by a hash of everything that shapes them (corpus fingerprint, tokenizer settings, shard
settings), so a second run reuses them and a changed setting never picks up stale files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flexbert import ModelConfig
from flexbert.data.collate import PaddedMLMCollator
from flexbert.data.corpus import CorpusSpec
from flexbert.data.loader import PackedMLMLoader, padded_loader, streaming_dataset
from flexbert.data.masking import MLMMasker
from flexbert.data.mds import prepare_mds, read_manifest
from flexbert.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from flexbert.registry import ConfigError
from flexbert.train.batching import StepBatcher

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :12
    ]


def corpus_spec(data: DictConfig) -> CorpusSpec | None:
    """The corpus to read, or None when the run reads prepared shards only."""
    return None if data.get("corpus") is None else CorpusSpec(**_plain(data.corpus))


def get_tokenizer(data: DictConfig, cache_dir: Path) -> tuple[Any, Path]:
    """Load `data.tokenizer.path` (a directory or a Hub id), or train one on the corpus (cached)."""
    tcfg = data.tokenizer
    if tcfg.get("path"):
        path = Path(tcfg.path)
        if not path.exists():  # a Hugging Face Hub id (or a clear error naming the path)
            from flexbert.hf import resolve_model_dir

            path = resolve_model_dir(tcfg.path)
        return load_tokenizer(path), path
    spec = corpus_spec(data)
    if spec is None:
        raise ConfigError("data.tokenizer.path is required when data.corpus is null")
    settings = {k: tcfg[k] for k in ("vocab_size", "num_unused", "min_frequency")}
    out = cache_dir / f"tokenizer-{_key({'corpus': spec.fingerprint(), **settings})}"
    if (out / "tokenizer.json").exists():
        log.info("tokenizer: reusing %s", out)
        return load_tokenizer(out), out
    log.info("tokenizer: training byte-level BPE (%s) on %s", settings, spec.source)
    tokenizer = train_tokenizer(spec.texts(), **settings)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    save_tokenizer(tokenizer, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return tokenizer, out


def get_shards(data: DictConfig, tokenizer: Any, cache_dir: Path) -> tuple[Path, dict | None]:
    """The MDS directory: `data.mds.dir` as given, or prepared from the corpus (cached)."""
    mds = _plain(data.mds)
    spec = corpus_spec(data)
    settings = {k: mds[k] for k in ("max_length", "val_fraction", "split_seed", "overflow")}
    if spec is None:
        if not mds.get("dir"):
            raise ConfigError("data.mds.dir is required when data.corpus is null")
        return Path(mds["dir"]), read_manifest(mds["dir"]) if not mds.get("remote") else None
    tok_sha = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    key = _key({"corpus": spec.fingerprint(), "tokenizer": tok_sha, **settings})
    out = Path(mds["dir"]) if mds.get("dir") else cache_dir / f"mds-{key}"
    manifest = prepare_mds(spec, out, tokenizer, progress=data.get("progress", True), **settings)
    log.info("shards: %s %s", "reusing" if manifest["reused"] else "wrote", out)
    return out, manifest


def _rows_per_rank(rows: int, what: str, world_size: int) -> int:
    if rows % world_size:
        raise ConfigError(f"data.{what}={rows} must be divisible by the world size ({world_size})")
    return rows // world_size


def build_loaders(
    data: DictConfig,
    model_cfg: ModelConfig,
    tokenizer: Any,
    mds_dir: Path,
    seed: int,
    world_size: int = 1,
) -> tuple[StepBatcher, Any]:
    """Train loader (optimizer steps of whole microbatches) and eval loader (microbatches)."""
    if data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len={data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}"
        )
    maskers = {
        "train": MLMMasker.from_tokenizer(tokenizer, data.mlm_probability),
        "val": MLMMasker.from_tokenizer(tokenizer, data.get("eval_mlm_probability", 0.15)),
    }
    micro = _rows_per_rank(data.micro_batch_size, "micro_batch_size", world_size)
    step = _rows_per_rank(data.batch_size, "batch_size", world_size)
    eval_micro = _rows_per_rank(data.eval_micro_batch_size, "eval_micro_batch_size", world_size)
    remote = data.mds.get("remote")

    def loader(split: str, rows: int, shuffle: bool, split_seed: int) -> Any:
        padded = model_cfg.padding == "padded"
        ds = streaming_dataset(
            mds_dir,
            remote=remote or None,
            split=split,
            shuffle=shuffle,
            seed=split_seed,
            batch_size=rows if padded else data.read_batch_size,
        )
        if padded:
            collator = PaddedMLMCollator(
                model_cfg.pad_token_id, data.seq_len, maskers[split], seed=split_seed
            )
            return padded_loader(ds, rows, collator)
        return PackedMLMLoader(
            ds,
            rows,
            data.seq_len,
            maskers[split],
            model_cfg.pad_token_id,
            buffer_size=data.buffer_size,
            seed=split_seed,
            prefetch=data.prefetch,
            fixed_masks=split == "val",
        )

    train = StepBatcher(loader("train", micro, True, seed), step, micro)
    return train, loader("val", eval_micro, False, seed + 1)
