"""The `data` config node -> tokenizer, MDS shards and the train/eval loaders.

Tokenizers and shards built from a corpus are cached under `paths.cache_dir` in directories
named by a hash of everything that shapes them (corpus fingerprint, tokenizer settings, shard
settings), so a second run reuses them and a changed setting never picks up stale files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flexbert import ModelConfig
from flexbert.data.collate import PaddedMLMCollator
from flexbert.data.corpus import CorpusSpec
from flexbert.data.loader import (
    PackedMLMLoader,
    StreamSpec,
    padded_eval_loader,
    padded_loader,
    streaming_dataset,
)
from flexbert.data.masking import MLMMasker
from flexbert.data.mds import MANIFEST, check_manifest_tokenizer, prepare_mds, read_manifest
from flexbert.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from flexbert.registry import ConfigError
from flexbert.train.batching import StepBatcher
from flexbert.train.runtime import rows_per_rank

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
    stale = out.parent / f".{out.name}.stale-{uuid.uuid4().hex[:8]}"
    if out.exists() and not (out / "tokenizer.json").exists():
        # No tokenizer in it (an interrupted save): moved aside in one step, so a process doing
        # the same meanwhile finds it gone instead of failing inside a half-removed tree.
        with contextlib.suppress(FileNotFoundError):
            os.replace(out, stale)
        if (stale / "tokenizer.json").exists():  # another process finished it in between
            with contextlib.suppress(OSError):
                os.replace(stale, out)
    try:
        os.replace(tmp, out)
    except OSError:  # `out` appeared meanwhile: a non-empty directory is not replaced
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "tokenizer.json").exists():
            raise
        # Another process (another node's local rank 0, on a shared filesystem) saved it
        # first and its ranks may be loading it already: every rank uses that one.
        log.info("tokenizer: another process saved it first; using %s", out)
        return load_tokenizer(out), out
    finally:
        shutil.rmtree(stale, ignore_errors=True)
    return tokenizer, out


STREAM_KEYS = ("dir", "remote", "proportion", "repeat", "choose")
WEIGHT_KEYS = ("proportion", "repeat", "choose")


def stream_specs(data: DictConfig) -> list[StreamSpec] | None:
    """`data.mds.streams` (name -> {dir, remote, proportion | repeat | choose}), validated."""
    streams = _plain(data.mds.get("streams"))
    if not streams:
        return None
    if not isinstance(streams, dict):
        raise ConfigError(
            "data.mds.streams must map stream names to {dir, remote, proportion, repeat, "
            f"choose}}, got {type(streams).__name__}"
        )
    specs = []
    for name, node in streams.items():
        node = node or {}
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ConfigError(
                f"data.mds.streams: name {name!r} may hold only letters, digits, '_', '.' and "
                "'-' (it names the stream's metrics)"
            )
        unknown = sorted(set(node) - set(STREAM_KEYS))
        if unknown:
            raise ConfigError(
                f"data.mds.streams.{name}: unknown key(s) {unknown}; valid keys are {list(STREAM_KEYS)}"
            )
        if not node.get("dir"):
            raise ConfigError(
                f"data.mds.streams.{name}.dir is required: the shard directory (or the local "
                f"cache of its remote)"
            )
        weights = [k for k in WEIGHT_KEYS if node.get(k) is not None]
        if len(weights) > 1:
            raise ConfigError(
                f"data.mds.streams.{name}: give at most one of {list(WEIGHT_KEYS)}, got {weights}"
            )
        specs.append(
            StreamSpec(name, str(node["dir"]), **{k: node.get(k) for k in STREAM_KEYS[1:]})
        )
    missing = [s.name for s in specs if s.proportion is None]
    if len(missing) not in (0, len(specs)):
        raise ConfigError(
            f"data.mds.streams: proportions are shares of one epoch, so every stream needs one "
            f"(missing: {missing}); or weight streams with repeat / choose instead"
        )
    return specs


def get_shards(
    data: DictConfig, tokenizer: Any, cache_dir: Path
) -> tuple[Path | None, dict | None]:
    """The MDS directory: `data.mds.dir` as given, or prepared from the corpus (cached); or,
    with `data.mds.streams`, None and a manifest of every stream's counts."""
    mds = _plain(data.mds)
    spec = corpus_spec(data)
    settings = {k: mds[k] for k in ("max_length", "val_fraction", "split_seed", "overflow")}
    streams = stream_specs(data)
    if streams is not None:
        if spec is not None:
            raise ConfigError(
                "data.mds.streams mixes prepared shards; set data.corpus=null (prepare each "
                "stream with `flexbert-data prepare`)"
            )
        counts, lengths = {}, []
        for stream in streams:
            manifest = shard_manifest(stream.local, stream.remote)
            if manifest is not None:
                check_manifest_tokenizer(manifest, tokenizer, stream.remote or stream.local)
            lengths.append(((manifest or {}).get("settings") or {}).get("max_length"))
            counts[stream.name] = (manifest or {}).get("counts")
        mixture = {"streams": [dataclasses.asdict(s) for s in streams], "counts": counts}
        if None not in lengths:  # every stream's known: the longest document any holds
            mixture["settings"] = {"max_length": max(lengths)}
        return None, mixture
    if spec is None:
        if not mds.get("dir"):
            raise ConfigError(
                "data.mds.dir (or data.mds.streams) is required when data.corpus is null"
            )
        manifest = shard_manifest(mds["dir"], mds.get("remote"))
        if manifest is not None:
            check_manifest_tokenizer(manifest, tokenizer, mds.get("remote") or mds["dir"])
        return Path(mds["dir"]), manifest
    tok_sha = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    key = _key({"corpus": spec.fingerprint(), "tokenizer": tok_sha, **settings})
    out = Path(mds["dir"]) if mds.get("dir") else cache_dir / f"mds-{key}"
    manifest = prepare_mds(spec, out, tokenizer, progress=data.get("progress", True), **settings)
    log.info("shards: %s %s", "reusing" if manifest["reused"] else "wrote", out)
    return out, manifest


def shard_manifest(local: str | Path, remote: str | None = None) -> dict | None:
    """The manifest.json of prepared shards, in `local`; for shards streamed from `remote`
    (s3://..., gs://..., a directory), fetched from there into `local` first, with
    mosaicml-streaming's downloaders, so their tokenizer and splits are checked as local
    ones are. A remote without one is a warning: nothing can be checked before training."""
    if remote:
        from streaming.base.storage.download import CloudDownloader

        target = Path(local) / MANIFEST
        target.parent.mkdir(parents=True, exist_ok=True)
        # fetched each run (the remote's shards may have been prepared again), beside the
        # cached copy first: the downloaders skip a file that exists
        fetched = target.with_name(f".{MANIFEST}.{os.getpid()}")
        fetched.unlink(missing_ok=True)
        try:
            CloudDownloader.direct_download(f"{str(remote).rstrip('/')}/{MANIFEST}", str(fetched))
            os.replace(fetched, target)
        except Exception as err:  # noqa: BLE001 - each object store raises its own
            fetched.unlink(missing_ok=True)
            target.unlink(missing_ok=True)  # never an older copy's word for the remote
            log.warning(
                "%s: no %s could be fetched (%s: %s); the shards' tokenizer and splits are "
                "not checked before training",
                remote,
                MANIFEST,
                type(err).__name__,
                err,
            )
            return None
    return read_manifest(local)


def check_splits(manifest: dict | None, where: Any) -> None:
    """Training reads the train split and evaluates on the val split: an empty one (shards
    prepared with --val-fraction 0, or a corpus too small for its fraction) is refused now
    rather than when the loader first opens it."""
    counts = (manifest or {}).get("counts") or {}
    empty = [s for s in ("train", "val") if s in counts and not counts[s].get("chunks")]
    if empty:
        raise ConfigError(
            f"{where}: the {' and '.join(empty)} split(s) hold no documents; prepare the shards "
            "with a val fraction that gives the val split some (flexbert-data prepare "
            "--val-fraction, data.mds.val_fraction for a corpus) and a train split that keeps some"
        )


def check_shard_length(data: DictConfig, padding: str, manifest: dict | None) -> None:
    """Padded rows hold one document each, cut to data.seq_len: shards prepared with longer
    documents would lose their ends, so that is refused (packed rows split them instead).
    Shards of shorter documents than data.seq_len are a warning: attention never crosses a
    document, so a context extension on them would never see a longer context."""
    longest = ((manifest or {}).get("settings") or {}).get("max_length")
    if longest and longest < data.seq_len:
        log.warning(
            "the shards hold documents of at most %d tokens (prepared with --max-length %d), "
            "shorter than data.seq_len=%d: no attention spans more than %d tokens; prepare "
            "them with --max-length %d to train on longer contexts",
            longest,
            longest,
            data.seq_len,
            longest,
            data.seq_len,
        )
    if padding == "padded" and longest and longest > data.seq_len:
        raise ConfigError(
            f"the shards hold documents of up to {longest} tokens (prepared with --max-length "
            f"{longest}) but data.seq_len={data.seq_len}: model.padding=padded would cut each "
            f"to {data.seq_len}; set data.seq_len={longest}, prepare the shards with "
            f"--max-length {data.seq_len}, or use model.padding=unpadded (packed rows)"
        )


def eval_stream_names(data: DictConfig, eval_batches: int = -1) -> list[str] | None:
    """The mixture's stream names when `data.eval_per_stream` asks for per-stream metrics.
    `eval_batches` (trainer.eval_subset_num_batches) must be -1: the val split is read stream
    after stream, so a subset would leave the later streams unevaluated."""
    if not data.get("eval_per_stream"):
        return None
    streams = stream_specs(data)
    if streams is None:
        raise ConfigError(
            "data.eval_per_stream=true needs a mixture (data.mds.streams); with one dataset the "
            "eval metrics are already its own"
        )
    if eval_batches != -1:
        raise ConfigError(
            f"data.eval_per_stream=true needs trainer.eval_subset_num_batches=-1 (got "
            f"{eval_batches}): the val split is read stream after stream, so a subset would "
            "never reach the later streams"
        )
    return [s.name for s in streams]


def build_loaders(
    data: DictConfig,
    model_cfg: ModelConfig,
    tokenizer: Any,
    mds_dir: Path | None,
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
    micro = rows_per_rank(data.micro_batch_size, "micro_batch_size", world_size)
    step = rows_per_rank(data.batch_size, "batch_size", world_size)
    eval_micro = rows_per_rank(data.eval_micro_batch_size, "eval_micro_batch_size", world_size)
    remote = data.mds.get("remote")
    streams = stream_specs(data)
    per_stream = eval_stream_names(data) is not None

    def loader(split: str, rows: int, shuffle: bool, split_seed: int) -> Any:
        padded = model_cfg.padding == "padded"
        ds = streaming_dataset(
            mds_dir,
            remote=remote or None,
            split=split,
            shuffle=shuffle,
            seed=split_seed,
            batch_size=rows if padded else data.read_batch_size,
            # The mixture weights shape training; evaluation reads every stream's val once.
            streams=streams and [s if split == "train" else s.unweighted() for s in streams],
        )
        stream_ids = per_stream and split == "val"  # each eval token's source stream
        if padded:
            collator = PaddedMLMCollator(
                model_cfg.pad_token_id,
                data.seq_len,
                maskers[split],
                seed=split_seed,
                stream_of=ds.stream_of if stream_ids else None,
            )
            if split == "val":  # every val document once over all ranks, ranks in step
                return padded_eval_loader(ds, rows, collator)
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
            stream_ids=stream_ids,
            finish_every_rank=split == "val",
        )

    train = StepBatcher(loader("train", micro, True, seed), step, micro, data.seq_len)
    return train, loader("val", eval_micro, False, seed + 1)
