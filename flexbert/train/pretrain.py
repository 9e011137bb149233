"""`flexbert-train`: MLM pretraining with Composer, driven by Hydra (conf/pretrain.yaml).

With no arguments it runs the embedded CPU quickstart: a capped stdlib corpus, a trained BPE
tokenizer, MDS shards, a tiny model trained for a few minutes, evaluation, a Hugging Face
export and `summary.json`. Everything lands in the Hydra run directory (runs/pretrain/<time>).
`train(cfg, run_dir)` is the same run without Hydra's command line, for tests and notebooks.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flexbert.registry import ConfigError
from flexbert.train.app import (
    absolute_if_local,
    check_config,
    composer_trainer,
    eval_metrics,
    finish_run,
    prepare_layers,
    run_app,
    trainer_kwargs,
)
from flexbert.train.batching import step_loader
from flexbert.train.checkpoints import last_checkpoint
from flexbert.train.continue_from import continue_from_path
from flexbert.train.runtime import (
    final_model,
    full_model,
    is_main_process,
    parameter_count,
    start_distributed,
)

log = logging.getLogger("flexbert.train")


def check_start_weights(cfg: DictConfig) -> None:
    """A recipe that continues a trained model (`requires_start_weights`, context extension)
    refuses a random start."""
    start = (
        cfg.trainer.get("load_path")
        or continue_from_path(cfg)
        or (cfg.get("init_from") or {}).get("path")
    )
    if cfg.get("requires_start_weights") and not start:
        raise ConfigError(
            "this recipe continues a trained model (requires_start_weights=true) but no weights "
            "were given: set continue_from.path=<previous phase's checkpoint .pt> (weights and "
            "optimizer moments), or init_from.path=<Hugging Face ModernBERT directory, run "
            "folder or checkpoint> (weights only), or trainer.load_path=<this phase's own "
            "checkpoint> to resume it"
        )


# Durations that the LR schedule turns into batches or tokens (Composer's Time strings).
SCHEDULE_KEYS = (
    "trainer.max_duration",
    "scheduler.t_warmup",
    "scheduler.t_decay",
    "scheduler.t_max",
)

# Intervals Composer's interval scheduler places (a `dur` fraction needs a sized loader)
INTERVAL_KEYS = ("trainer.eval_interval", "trainer.save_interval")


def check_durations_without_epochs(cfg: DictConfig) -> None:
    """Pretraining streams packed batches: how many make an epoch is known only when the
    epoch ends, so a duration in epochs (`1ep`, or a bare number, which Composer reads as
    epochs) cannot be turned into the batches the LR schedule counts, nor an eval or save
    interval in `dur` into batches. Refused by name."""
    from composer.core import Time, TimeUnit

    for key in SCHEDULE_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or isinstance(value, bool):
            continue
        try:
            unit = Time.from_input(value, TimeUnit.EPOCH).unit
        except (TypeError, ValueError):  # not a duration: Composer's own error, later
            continue
        if unit == TimeUnit.EPOCH:
            raise ConfigError(
                f"{key}={value!r} counts epochs, and a pretraining stream of packed batches "
                "has no epoch length before it ends: give tokens (e.g. 1000000000tok; "
                "`flexbert-data inspect <shards>` counts the train split's), batches (800ba), "
                "samples (1000sp; in packed pretraining a sample is a document, and a row "
                "holds several) or, for the scheduler, a fraction of max_duration (0.1dur)"
            )
    for key in INTERVAL_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        try:
            unit = Time.from_input(value, TimeUnit.EPOCH).unit if value is not None else None
        except (TypeError, ValueError):
            continue
        if unit == TimeUnit.DURATION:
            raise ConfigError(
                f"{key}={value!r} is a fraction of the run, which Composer places only on a "
                "loader of known length, and a pretraining stream of packed batches has none: "
                "give batches (2000ba) or tokens (100000000tok)"
            )


def build_trainer(cfg: DictConfig, run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Everything up to a ready `composer.Trainer`; returns it and the facts for the summary."""
    check_start_weights(cfg)
    from composer import Evaluator
    from composer.utils import dist, reproducibility

    from flexbert import FlexBertForMaskedLM
    from flexbert.data.tokenizer import special_token_ids
    from flexbert.train.callbacks import LossHistory
    from flexbert.train.checkpoints import (
        check_checkpoint_fits,
        check_run_dir,
        init_from,
        write_run_files,
    )
    from flexbert.train.composer_model import ComposerFlexBertMLM
    from flexbert.train.data import (
        build_loaders,
        check_shard_length,
        check_splits,
        eval_stream_names,
        get_shards,
        get_tokenizer,
    )
    from flexbert.train.data_spec import flexbert_data_spec
    from flexbert.train.model_config import check_tokenizer_fits, resolve_model_config

    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.paths.cache_dir)
    with dist.run_local_rank_zero_first():  # one process per node writes the cached data
        tokenizer, tokenizer_src = get_tokenizer(cfg.data, cache_dir)
        model_cfg = resolve_model_config(cfg.model, special_token_ids(tokenizer))
        check_tokenizer_fits(tokenizer, model_cfg)
        check_run_dir(run_dir, model_cfg, cfg.trainer)  # before any data is prepared
        mds_dir, manifest = get_shards(cfg.data, tokenizer, cache_dir)
    check_shard_length(cfg.data, model_cfg.padding, manifest)
    check_splits(manifest, mds_dir)
    train_loader, eval_loader = build_loaders(
        cfg.data, model_cfg, tokenizer, mds_dir, cfg.seed, dist.get_world_size()
    )
    # What export and resumption need, written before training so any checkpoint is usable.
    if is_main_process():
        write_run_files(run_dir, model_cfg, tokenizer)

    reproducibility.seed_all(cfg.seed)
    mlm = FlexBertForMaskedLM(model_cfg)
    growth = init_from(cfg.get("init_from"), mlm)
    if growth:
        log.info(
            "init_from %s: (layers, hidden, intermediate) %s -> %s, %s tiling, %s layer map",
            growth["path"],
            growth["source_shape"],
            growth["target_shape"],
            growth["tile_mode"],
            growth["layer_map"],
        )
    prepare_layers(cfg, mlm)
    subset = int(cfg.trainer.get("eval_subset_num_batches", -1))
    model = ComposerFlexBertMLM(mlm, eval_stream_names(cfg.data, subset) or ())
    autoresumes = cfg.trainer.get("autoresume") and last_checkpoint(run_dir) is not None
    for setting, path in (
        ("trainer.load_path", cfg.trainer.get("load_path")),
        ("continue_from.path", continue_from_path(cfg)),
    ):
        partial = cfg.trainer.get("load_strict_model_weights") is False or cfg.trainer.get(
            "load_ignore_keys"
        )
        if path and not autoresumes and not partial:  # autoresume loads the run's own instead
            check_checkpoint_fits(path, model, setting)
    history = LossHistory()
    world = dist.get_world_size()
    trainer = composer_trainer(
        cfg,
        run_dir,
        model,
        flexbert_data_spec(step_loader(train_loader)),  # Composer checkpoints its state
        Evaluator(
            label="eval",
            dataloader=flexbert_data_spec(eval_loader, whole_batches=True),  # rows per rank
            device_eval_microbatch_size=cfg.data.eval_micro_batch_size // world,
        ),
        [history],
        device_train_microbatch_size=cfg.data.micro_batch_size // world,
        **trainer_kwargs(cfg),
    )
    facts = {
        "model_config": model_cfg,
        "tokenizer": tokenizer,
        "tokenizer_source": absolute_if_local(tokenizer_src),
        "mds_dir": absolute_if_local(mds_dir) if mds_dir else None,
        "manifest": manifest,
        "history": history,
        "train_loader": train_loader,
        "init_from": growth,
    }
    return trainer, facts


def _metrics(trainer: Any) -> dict[str, float]:
    import math

    out = eval_metrics(trainer)
    for name, value in list(out.items()):  # also each stream's "LanguageCrossEntropy/<name>"
        if name.split("/")[0] == "LanguageCrossEntropy":
            out[name.replace("LanguageCrossEntropy", "Perplexity")] = math.exp(min(value, 50.0))
    return out


def _export(model: Any, tokenizer: Any, out: Path) -> str | None:
    """Write the HF checkpoint; return why not when the model has no HF ModernBERT form."""
    from flexbert import ConfigError
    from flexbert.data.tokenizer import save_tokenizer

    try:
        model.save_hf(out)
    except ConfigError as e:
        log.warning("no Hugging Face export: %s", e)
        return str(e)
    save_tokenizer(tokenizer, out, model.config.max_seq_len)
    return None


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Pretrain as `cfg` says, write checkpoints, the HF export and summary.json into run_dir.
    The run's streaming datasets are stopped when it ends, their shared memory released."""
    from flexbert.data.streaming_lifecycle import streaming_scope

    check_config(cfg)
    check_durations_without_epochs(cfg)
    with streaming_scope():
        return _train(cfg, run_dir)


def _train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = start_distributed(cfg, Path(run_dir).resolve())
    trainer, facts = build_trainer(cfg, run_dir)
    state = trainer.state
    start_batch, start_tokens = int(state.timestamp.batch), int(state.timestamp.token)
    eval_only = bool(cfg.get("eval_only"))
    t0 = time.perf_counter()
    if not eval_only:
        trainer.fit()  # Composer usually evaluates at its end (not with eval_interval=0)
    seconds = time.perf_counter() - t0
    if facts["history"].last_eval_batch != int(state.timestamp.batch):  # final weights unscored
        trainer.eval()
    metrics = _metrics(trainer)
    trained = final_model(trainer)
    main = is_main_process()
    hf_dir = run_dir / "hf"
    if eval_only:
        skipped = "eval_only (nothing was trained)"
    elif cfg.get("export_hf", True):
        model = full_model(trained)  # every rank gathers; rank 0 gets it, the others None
        skipped = _export(model, facts["tokenizer"], hf_dir) if main else None
    else:
        skipped = "off"
    tokens = int(state.timestamp.token) - start_tokens
    steps = facts["history"].steps
    last = last_checkpoint(run_dir)
    summary = {
        "command": " ".join(["flexbert-train", *sys.argv[1:]]),
        "run_dir": str(run_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model_config": facts["model_config"].to_dict(),
        "parameters": parameter_count(trained),
        "init_from": facts["init_from"],
        "data": {
            "tokenizer": facts["tokenizer_source"],
            "tokenizer_size": len(facts["tokenizer"]),
            "mds_dir": facts["mds_dir"],
            "counts": (facts["manifest"] or {}).get("counts"),
            "streams": (facts["manifest"] or {}).get("streams"),
        },
        "train": {
            "batches": int(state.timestamp.batch),
            "batches_this_run": int(state.timestamp.batch) - start_batch,
            "tokens": int(state.timestamp.token),
            "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "loss_first": steps[0]["loss"] if steps else None,
            "loss_last": steps[-1]["loss"] if steps else None,
            "loss_curve": steps,
        },
        "eval": metrics,
        "paths": {
            "run_dir": str(run_dir),
            "checkpoints": str(run_dir / "checkpoints"),
            "last_checkpoint": str(last) if last else None,
            "hf": None if skipped else str(hf_dir),
            "hf_skipped": skipped,
            "tokenizer": str(run_dir / "tokenizer"),
            "summary": str(run_dir / "summary.json"),
        },
    }
    finish_run(trainer, run_dir, summary, main)
    return summary


def report(summary: dict[str, Any]) -> str:
    """The closing console message: what was trained and where everything went."""
    t, e, p = summary["train"], summary["eval"], summary["paths"]
    done = (
        "evaluated (eval_only)"
        if summary["config"].get("eval_only")
        else f"done in {t['seconds']:.0f}s, {t['batches_this_run']} batches this run"
        + (f" ({t['batches']} in all)" if t["batches"] != t["batches_this_run"] else "")
        + f", {t['tokens']:,} tokens in all ({t['tokens_per_second'] or 0:,.0f} tokens/s)"
    )
    lines = [
        "",
        f"flexbert-train: {done}",
        f"  train loss   {t['loss_first']:.3f} -> {t['loss_last']:.3f}"
        if t["loss_first"] is not None
        else "  train loss   (no steps this run)",
    ]
    if e:
        lines.append("  eval         " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(e.items())))
    lines += [
        f"  run dir      {p['run_dir']}",
        f"  checkpoint   {p['last_checkpoint']}",
        f"  HF model     {p['hf'] or 'not exported: ' + str(p['hf_skipped'])}",
        f"  tokenizer    {p['tokenizer']}",
        f"  summary      {p['summary']}",
    ]
    if p["hf"]:
        lines.append(
            f"  load it:     AutoModelForMaskedLM.from_pretrained('{p['hf']}')"
            f" / AutoTokenizer.from_pretrained('{p['hf']}')"
        )
    return "\n".join(lines)


def _run(cfg: DictConfig, run_dir: Path) -> float | None:
    summary = train(cfg, run_dir)
    if is_main_process():
        print(report(summary), flush=True)
    return summary["eval"].get("LanguageCrossEntropy")  # what a sweeper would minimise


def main() -> None:
    """Console entry point: Hydra parses the command line (`--help` lists the groups)."""
    run_app("flexbert-train", "pretrain", _run)


if __name__ == "__main__":
    main()
