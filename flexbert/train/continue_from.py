"""`continue_from`: start a new training phase from a Composer checkpoint.

ModernBERT's later phases (context extension, the final LR decay, the large model's restart at
lr 5e-5) keep the previous phase's weights *and* optimizer moments but take their learning
rate, weight decay and schedule from the new recipe (the reference's `restart_override`).
Three ways to start from trained weights, side by side:

- `trainer.load_path`: resume a run exactly (its hyperparameters, clock and data position);
- `continue_from.path`: a new phase: weights and moments from the checkpoint, every optimizer
  hyperparameter from this config; with `reset_time` (default) the clock, the schedule and the
  data position start at zero (a new dataset), without it they continue the checkpoint's;
- `init_from.path`: weights only (a fresh optimizer), from a run or a Hugging Face directory,
  grown when the model is larger.

Autoresume still wins: a new-phase run that restarts finds its own latest checkpoint and
resumes that exactly, without re-applying anything here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from flexbert.registry import ConfigError

# What a new phase leaves behind with reset_time=true (Composer's load_ignore_keys paths).
RESET_KEYS = ("state/timestamp", "state/dataset_state", "state/schedulers")
# Param-group entries that are optimizer state, not settings: they come from the checkpoint
# (torch-optimi keeps its step count in the group and sets it up again when `setup` is off).
GROUP_STATE_KEYS = ("params", "step", "setup", "initial_lr")


def continue_from_path(cfg: DictConfig) -> str | None:
    """`continue_from.path`, or None when the run does not continue a checkpoint."""
    node = cfg.get("continue_from") or {}
    return node.get("path") or None


def trainer_load_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """composer.Trainer's load arguments for `continue_from` (empty when it is unset): the
    whole checkpoint, less the clock, data position and schedulers with `reset_time`."""
    path = continue_from_path(cfg)
    if path is None:
        return {}
    if cfg.trainer.get("load_path"):
        raise ConfigError(
            f"continue_from.path={path} and trainer.load_path={cfg.trainer.load_path} are both "
            "set: trainer.load_path resumes a run exactly (its lr, schedule, clock and data "
            "position), continue_from.path starts a new phase from a checkpoint; keep one"
        )
    if cfg.trainer.get("load_weights_only"):
        raise ConfigError(
            "continue_from.path keeps the checkpoint's optimizer moments, but "
            "trainer.load_weights_only=true would drop them: unset it, or use init_from.path "
            "for a start from the weights alone"
        )
    reset = bool(cfg.continue_from.get("reset_time", True))
    ignore = list(cfg.trainer.get("load_ignore_keys") or [])  # the user's own, kept
    if reset:
        ignore += [k for k in RESET_KEYS if k not in ignore]
    return {
        "load_path": str(path),
        "load_weights_only": False,
        "load_ignore_keys": ignore or None,
    }


def fresh_hyperparameters(optimizer: Any) -> list[dict[str, Any]]:
    """Each param group's settings as this config built them (not its parameters or state)."""
    return [
        {k: v for k, v in g.items() if k not in GROUP_STATE_KEYS} for g in optimizer.param_groups
    ]


def apply(trainer: Any, cfg: DictConfig, fresh: list[dict[str, Any]]) -> dict[str, Any] | None:
    """After Composer loaded the checkpoint: put back this config's optimizer hyperparameters
    (`fresh`, from `fresh_hyperparameters` before loading) in every param group, keeping the
    loaded moments, and rebase the schedulers on the new learning rate. Returns what was done
    (for summary.json), or None when there was nothing to do: no `continue_from`, or Composer
    autoresumed this run's own checkpoint instead."""
    path = continue_from_path(cfg)
    loaded = trainer.state.load_path
    if path is None or loaded is None or Path(str(loaded)) != Path(str(path)):
        return None
    optimizer = trainer.state.optimizers[0]
    before = [g["lr"] for g in optimizer.param_groups]
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
        group["initial_lr"] = settings["lr"]  # what a scheduler scales (LambdaLR base_lrs)
    for scheduler in trainer.state.schedulers:
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        now = [
            base * fn(scheduler.last_epoch)
            for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, lr in zip(optimizer.param_groups, now):
            group["lr"] = lr
        scheduler._last_lr = now
    return {
        "path": str(path),
        "reset_time": bool(cfg.continue_from.get("reset_time", True)),
        "checkpoint_lr": before,
        "lr": [g["initial_lr"] for g in optimizer.param_groups],
        "weight_decay": [g.get("weight_decay") for g in optimizer.param_groups],
        "start_batch": int(trainer.state.timestamp.batch),
    }
