"""What the Hydra entry points (`flexbert-train`, `flexbert-finetune`) share: Composer pieces
from config nodes, eval metrics, and running a task with one clear line for bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flexbert.train.paths import conf_dir, register_overlays


def instantiate_all(node: DictConfig | None) -> list[Any]:
    """Every `_target_` entry of a group node (callbacks, loggers); null entries are skipped."""
    from hydra.utils import instantiate

    return [instantiate(v) for v in (node or {}).values() if v is not None]


FLEXBERT_TRAINER_KEYS = ("compile_layers",)  # in the trainer node, not composer.Trainer's


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The `trainer` node as composer.Trainer keyword arguments."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {
        k: v
        for k, v in kwargs.items()
        if k not in FLEXBERT_TRAINER_KEYS and not (k == "compile_config" and v is None)
    }


def maybe_compile_layers(cfg: DictConfig, model: Any) -> None:
    """`trainer.compile_layers=true`: torch.compile every encoder layer of `model` in place."""
    if cfg.trainer.get("compile_layers"):
        model.compile_layers(dynamic=True)


def check_device(cfg: DictConfig) -> None:
    """A GPU trainer config on a machine without CUDA fails here, in one line."""
    import torch

    from flexbert import ConfigError

    if cfg.trainer.get("device") == "gpu" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=gpu (trainer=gpu, or an experiment that selects it) but torch sees "
            "no CUDA GPU here; add trainer=cpu to run on the CPU"
        )


def start_distributed(cfg: DictConfig, run_dir: Path) -> Path:
    """Check the trainer's device; under a multi-process launcher (`composer -n N`),
    initialise torch.distributed now, as composer.Trainer would later, so data preparation can
    run on local rank 0 first; return rank 0's run directory, which every rank then uses.
    One process: `run_dir` unchanged."""
    from composer.utils import dist

    check_device(cfg)
    if dist.get_world_size() == 1:
        return run_dir
    dist.initialize_dist(cfg.trainer.get("device"))
    return Path(dist.all_gather_object(str(run_dir))[0])


def is_main_process() -> bool:
    """Global rank 0: the process that writes summaries, exports and prints."""
    from composer.utils import dist

    return dist.get_global_rank() == 0


def trained_model(trainer: Any) -> Any:
    """The FlexBERT model inside the trainer's ComposerModel (unwrapping DDP)."""
    wrapper = trainer.state.model
    return getattr(wrapper, "module", wrapper).model


def composer_trainer(
    cfg: DictConfig,
    run_dir: Path,
    model: Any,
    train_dataloader: Any,
    evaluator: Any,
    callbacks: list[Any],
    **trainer_args: Any,
) -> Any:
    """A `composer.Trainer` from a run's config: optimizer, scheduler, the `callbacks` and
    `logger` groups (plus the run's own `callbacks`), checkpoints in run_dir/checkpoints.
    `trainer_args` are the remaining Trainer keywords (usually from `trainer_kwargs`)."""
    from composer import Trainer
    from hydra.utils import instantiate

    from flexbert.train.optim import build_optimizer

    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        eval_dataloader=evaluator,
        optimizers=build_optimizer(cfg.optimizer, model, cfg.trainer.get("device") or "cpu"),
        schedulers=instantiate(cfg.scheduler),
        callbacks=[*instantiate_all(cfg.get("callbacks")), *callbacks],
        loggers=build_loggers(cfg, run_dir),
        save_folder=str(run_dir / "checkpoints"),
        run_name=cfg.get("run_name") or run_dir.name,
        seed=cfg.seed,
        **trainer_args,
    )
    log_config_to_wandb(trainer, cfg)
    return trainer


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """The `logger` group; a W&B logger keeps its files in run_dir/wandb and, in a sweep,
    groups its runs under the sweep directory's name (unless the config says otherwise)."""
    from hydra.utils import instantiate

    group = cfg.get("logger")
    node = OmegaConf.to_container(group, resolve=True) if group else {}
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
        loggers.append(instantiate(entry))
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
    from composer.loggers import WandBLogger

    config = OmegaConf.to_container(cfg, resolve=True)
    for destination in trainer.logger.destinations:
        if isinstance(destination, WandBLogger):
            destination.log_hyperparameters(config)


def eval_metrics(trainer: Any) -> dict[str, float]:
    """The last values of the `eval` evaluator's metrics."""
    return {k: float(m.compute()) for k, m in trainer.state.eval_metrics.get("eval", {}).items()}


def run_app(prog: str, config_name: str, task: Callable[[DictConfig, Path], Any]) -> None:
    """Run `task(cfg, run_dir)` under Hydra; a bad setting or input ends with one line, exit 2."""
    import hydra

    def hydra_task(cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig

        from flexbert import ConfigError
        from flexbert.data.errors import DataError
        from flexbert.hf import CheckpointError

        try:
            return task(cfg, Path(HydraConfig.get().runtime.output_dir))
        except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    register_overlays()
    hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(
        hydra_task
    )()
