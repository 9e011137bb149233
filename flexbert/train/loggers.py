"""Composer loggers from the `logger` config group, adapted where Composer lags its deps.

Composer 0.32's WandBLogger calls `wandb.run.get_url()`, which wandb removed (0.2x+: the
`Run.url` property). `WandBLogger` here restores that one method, then is Composer's logger.
`build_loggers` gives each run its own W&B directory (and a sweep's jobs one group);
`log_config_to_wandb` records the whole resolved run config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from composer.loggers import WandBLogger as _ComposerWandBLogger
from omegaconf import DictConfig, OmegaConf


def _restore_get_url() -> None:
    from wandb.sdk.wandb_run import Run

    if not hasattr(Run, "get_url"):
        Run.get_url = lambda self: self.url  # type: ignore[attr-defined]


class WandBLogger(_ComposerWandBLogger):
    """Composer's WandBLogger, working with current wandb (offline mode needs no network)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _restore_get_url()
        super().__init__(*args, **kwargs)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """The `logger` group; a W&B logger keeps its files in run_dir/wandb and, in a sweep,
    groups its runs under the sweep directory's name (unless the config says otherwise)."""
    from flexbert.train.app import instantiate_node

    logger_group = cfg.get("logger")
    node = OmegaConf.to_container(logger_group, resolve=True) if logger_group else {}
    loggers = []
    for entry in node.values():  # type: ignore[union-attr]
        if entry is None:
            continue
        if str(entry.get("_target_", "")).endswith("WandBLogger"):
            init = entry.setdefault("init_kwargs", {}) or {}
            entry["init_kwargs"] = init
            init.setdefault("dir", str(run_dir))
            group = sweep_name()
            if group:
                init.setdefault("group", group)
        loggers.append(instantiate_node(entry))
    return loggers


def sweep_name() -> str | None:
    """The sweep directory's name when running as a job of a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None


def log_config_to_wandb(trainer: Any, cfg: DictConfig) -> None:
    """The whole resolved run config as W&B hyperparameters (filter and compare runs by it)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for destination in trainer.logger.destinations:
        if isinstance(destination, _ComposerWandBLogger):
            destination.log_hyperparameters(config)
