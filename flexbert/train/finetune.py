"""`flexbert-finetune`: fine-tune a pretrained encoder with Composer (conf/finetune.yaml).

Sequence classification / regression (GLUE-style, one or two text fields), token
classification, multiple choice, extractive question answering (`finetune_qa.py`) and
retrieval (`finetune_retrieval.py`), from local files, a saved `datasets` directory or a Hub
dataset name. The pretrained encoder (`model.path`) is a Hugging Face directory or Hub id, or a flexbert-train
run folder or Composer checkpoint (so ablated models without a Hugging Face form fine-tune too).
The run evaluates each epoch, checkpoints, saves the fine-tuned model as a Hugging Face
directory (`<run_dir>/hf`, loadable with the task's AutoModelFor... class; skipped, with the
reason in the summary, for a model ModernBERT cannot express) and writes `summary.json`. `train(cfg, run_dir)` is the same run without Hydra's command line.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

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
from flexbert.train.checkpoints import last_checkpoint
from flexbert.train.runtime import (
    final_model,
    full_model,
    is_main_process,
    parameter_count,
    rows_per_rank,
    start_distributed,
)

log = logging.getLogger("flexbert.train")

PREDICTIONS_FILE = "eval_predictions.json"  # question answering: the last evaluation's answers


def _loader(
    rows: list[dict[str, Any]], batch_size: int, collate: Any, shuffle: bool, seed: int = 0
) -> Any:
    """Batches of `rows` for this rank; `shuffle` in an order drawn from `seed` (the run's
    seed: a seed sweep varies the data order too, not only the head's initialisation)."""
    from composer.utils import dist
    from torch.utils.data import DataLoader

    sampler = dist.get_sampler(rows, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
    return DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=collate)  # type: ignore[arg-type]


def example_counts(examples: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """Rows per split; for question answering read in windows, the eval split's examples
    too (`eval_examples`: its rows are windows)."""
    counts = {k: len(v) for k, v in examples.items()}
    eval_rows = examples.get("eval") or []
    if eval_rows and "example_id" in eval_rows[0]:
        counts["eval_examples"] = len({r["example_id"] for r in eval_rows})
    return counts


def _in_batches(kwargs: dict[str, Any], per_epoch: int) -> dict[str, Any]:
    """max_duration "Nep" -> batches, so scheduler fractions (0.06dur) are not rounded to 0ep."""
    duration = str(kwargs.get("max_duration", ""))
    if duration.endswith("ep") and duration[:-2].isdigit():
        kwargs["max_duration"] = f"{int(duration[:-2]) * per_epoch}ba"
    return kwargs


def build_trainer(cfg: DictConfig, run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Model, data and a ready `composer.Trainer`; returns it and the facts for the summary."""
    from composer import Evaluator
    from composer.utils import dist, reproducibility

    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.registry import ConfigError
    from flexbert.train.callbacks import LossHistory
    from flexbert.train.checkpoints import check_run_dir, find_run_checkpoint, write_run_files
    from flexbert.train.data_spec import flexbert_data_spec
    from flexbert.train.finetune_colbert import document_length
    from flexbert.train.finetune_model import (
        EvalHistory,
        composer_parts,
        load_task_model,
        pretrained_tokenizer,
    )
    from flexbert.train.model_config import check_tokenizer_fits
    from flexbert.train.tasks import build_examples

    world = dist.get_world_size()  # each rank's share of a batch, before anything is written
    train_rows = rows_per_rank(cfg.data.batch_size, "batch_size", world)
    eval_rows = rows_per_rank(cfg.data.eval_batch_size, "eval_batch_size", world)
    run_dir.mkdir(parents=True, exist_ok=True)
    reproducibility.seed_all(cfg.seed)
    # a run folder names its newest checkpoint once: model, tokenizer and summary agree on it
    source = find_run_checkpoint(cfg.model.path) if cfg.model.get("path") else None
    tok_path = pretrained_tokenizer(cfg, source)
    tokenizer = load_tokenizer(tok_path)
    model = load_task_model(cfg, source.checkpoint if source else None, tokenizer)
    prepare_layers(cfg, model)
    check_tokenizer_fits(tokenizer, model.config)
    max_len = int(cfg.data.max_seq_len)
    if max_len > model.config.max_seq_len:
        raise ConfigError(
            f"data.max_seq_len={max_len} exceeds the model's max_seq_len="
            f"{model.config.max_seq_len} (its position limit): set data.max_seq_len<="
            f"{model.config.max_seq_len}"
        )
    examples, label_names = build_examples(cfg.task, tokenizer, max_len)
    composer_model, collate = composer_parts(cfg.task, model, tokenizer.pad_token_id, label_names)
    task = {"name": cfg.task.name, "type": cfg.task.type, "labels": label_names}
    if cfg.task.type == "colbert":  # what its PyLate export needs (flexbert-export too)
        task["document_length"] = document_length(cfg.task, max_len)
    check_run_dir(run_dir, model.config, cfg.trainer)
    if is_main_process():
        write_run_files(run_dir, model.config, tokenizer, task)
    train_loader = _loader(examples["train"], train_rows, collate, True, int(cfg.seed))
    # Composer's eval drops the rows DistributedSampler repeats: each eval row counts once
    eval_loader = _loader(examples["eval"], eval_rows, collate, False)

    history, evals = LossHistory(), EvalHistory()
    callbacks: list[Any] = [history, evals]
    if cfg.task.type == "question_answering":  # the answers themselves, for error analysis
        from flexbert.train.finetune_qa import QAPredictions

        callbacks.append(QAPredictions(run_dir / PREDICTIONS_FILE))
        if is_main_process():  # a resumed run's earlier answers are not this run's
            (run_dir / PREDICTIONS_FILE).unlink(missing_ok=True)
    trainer = composer_trainer(
        cfg,
        run_dir,
        composer_model,
        flexbert_data_spec(train_loader),
        Evaluator(
            label="eval",
            dataloader=flexbert_data_spec(eval_loader),
            metric_names=list(composer_model.val_metrics),
        ),
        callbacks,
        **_in_batches(trainer_kwargs(cfg), len(train_loader)),
    )
    facts = {
        "pretrained": {
            "path": absolute_if_local(cfg.model.path),
            "checkpoint": absolute_if_local(source.checkpoint) if source else None,
        },
        "tokenizer": tokenizer,
        "tokenizer_source": absolute_if_local(tok_path),
        "task": task,
        "history": history,
        "evals": evals,
        "counts": example_counts(examples),
    }
    return trainer, facts


# Tasks scored over the whole eval split at once: each query against every document, each
# answer over all of its context's windows; a subset of batches would change the task.
WHOLE_EVAL_TASKS = ("retrieval", "colbert", "question_answering")


def check_whole_eval(cfg: DictConfig) -> None:
    """Refuse trainer.eval_subset_num_batches for the tasks a subset would change."""
    from flexbert.registry import ConfigError

    subset = cfg.trainer.get("eval_subset_num_batches", -1)
    if subset not in (-1, None) and cfg.task.type in WHOLE_EVAL_TASKS:
        raise ConfigError(
            f"trainer.eval_subset_num_batches={subset}: a {cfg.task.type} task is scored over "
            "its whole eval split (a subset would rank queries against part of the corpus or "
            "answer from part of a context); set it to -1"
        )


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Fine-tune as `cfg` says; write checkpoints, `hf/` and summary.json into run_dir."""
    from flexbert.train.finetune_model import save_task_model

    check_config(cfg)
    check_whole_eval(cfg)
    run_dir = start_distributed(cfg, Path(run_dir).resolve())
    trainer, facts = build_trainer(cfg, run_dir)
    state = trainer.state
    start_tokens = int(state.timestamp.token)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    tokens = int(state.timestamp.token) - start_tokens
    scored = facts["evals"].evals
    if not scored or scored[-1]["batch"] != int(state.timestamp.batch):  # final weights unscored
        trainer.eval()  # (eval_interval=0 or longer than the run, or not at its end)
    metrics = eval_metrics(trainer)
    trained = final_model(trainer)
    main = is_main_process()
    hf_dir = run_dir / "hf"
    skipped = None if cfg.get("export_hf", True) else "export_hf=false"
    if not skipped:
        model = full_model(trained)  # every rank gathers; rank 0 gets it, the others None
        if main:
            skipped = save_task_model(model, facts["tokenizer"], hf_dir, facts["task"])
            if skipped:
                log.warning("no Hugging Face export (hf/): %s", skipped)
    steps = facts["history"].steps
    last = last_checkpoint(run_dir)
    summary = {
        "command": " ".join(["flexbert-finetune", *sys.argv[1:]]),
        "run_dir": str(run_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "task": facts["task"],
        "pretrained": facts["pretrained"],
        "model_config": trained.config.to_dict(),
        "parameters": parameter_count(trained),
        "data": {"tokenizer": facts["tokenizer_source"], "examples": facts["counts"]},
        "train": {
            "epochs": int(state.timestamp.epoch),
            "batches": int(state.timestamp.batch),
            "seconds": round(seconds, 2),
            "tokens": int(state.timestamp.token),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "loss_first": steps[0]["loss"] if steps else None,
            "loss_last": steps[-1]["loss"] if steps else None,
            "loss_curve": steps,
        },
        "eval": metrics,
        "eval_history": facts["evals"].evals,
        "eval_best": best_eval(facts["evals"].evals, list(cfg.task.metrics)),
        "paths": {
            "run_dir": str(run_dir),
            "checkpoints": str(run_dir / "checkpoints"),
            "last_checkpoint": str(last) if last else None,
            "hf": None if skipped else str(hf_dir),
            "hf_skipped": skipped,
            "summary": str(run_dir / "summary.json"),
        },
    }
    if (run_dir / PREDICTIONS_FILE).exists():
        summary["paths"]["predictions"] = str(run_dir / PREDICTIONS_FILE)
    finish_run(trainer, run_dir, summary, main)
    return summary


def best_eval(history: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any] | None:
    """The evaluation with the highest value of the task's first metric (the one a sweep
    maximises), with its epoch and batch: what to report for GLUE-style fine-tuning. A NaN
    (or missing) value is no score: max() would keep a NaN it met first."""
    import math

    if not metrics or not history:
        return None
    key = metrics[0]
    scored = [e for e in history if e.get(key) is not None and math.isfinite(e[key])]
    if not scored:
        return None
    best = max(scored, key=lambda e: e[key])
    return {"metric": key, "value": best[key], "epoch": best["epoch"], "batch": best["batch"]}


def report(summary: dict[str, Any]) -> str:
    """The closing console message: what was fine-tuned, how well, and where it went."""
    from flexbert.train.checkpoints import task_model_class
    from flexbert.train.export import auto_class

    t, e, p, task = summary["train"], summary["eval"], summary["paths"], summary["task"]
    lines = [
        "",
        f"flexbert-finetune: {task['name']} ({task['type']}) done in {t['seconds']:.0f}s, "
        f"{t['epochs']} epochs, {t['batches']} batches, {t['tokens']:,} tokens "
        f"({t['tokens_per_second'] or 0:,.0f} tokens/s)",
        f"  train loss   {t['loss_first']:.3f} -> {t['loss_last']:.3f}"
        if t["loss_first"] is not None
        else "  train loss   (no steps this run)",
        "  eval         " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(e.items())),
    ]
    b = summary.get("eval_best")
    if b:
        lines.append(f"  best         {b['metric']} {b['value']:.4g} at epoch {b['epoch']}")
    lines += [
        f"  run dir      {p['run_dir']}",
        f"  checkpoint   {p['last_checkpoint']}",
        f"  HF model     {p['hf'] or 'not exported: ' + str(p.get('hf_skipped'))}",
        f"  summary      {p['summary']}",
    ]
    if p["hf"]:
        lines.append(f"  load it:     {auto_class(p['hf'])}.from_pretrained('{p['hf']}')")
    elif p["last_checkpoint"]:  # no HF form: FlexBERT reads its own checkpoint
        cls = task_model_class(task["type"]).__name__
        lines.append(
            "  load it:     flexbert.train.checkpoints.load_checkpoint_model("
            f"'{p['last_checkpoint']}', read_model_config('{p['run_dir']}/model_config.json'), "
            f"flexbert.{cls})"
        )
    return "\n".join(lines)


def _run(cfg: DictConfig, run_dir: Path) -> float | None:
    summary = train(cfg, run_dir)
    if is_main_process():
        print(report(summary), flush=True)
    metrics = summary["eval"]
    return metrics.get(cfg.task.metrics[0]) if cfg.task.metrics else None  # what a sweep maximises


def main() -> None:
    """Console entry point: Hydra parses the command line (`--help` lists the groups)."""
    run_app("flexbert-finetune", "finetune", _run)


if __name__ == "__main__":
    main()
