"""What the Hydra entry points (`flexbert-train`, `flexbert-finetune`) share: Composer pieces
from config nodes, eval metrics, and running a task with one clear line for bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flexbert.registry import ConfigError
from flexbert.train.paths import conf_dir, register_overlays

log = logging.getLogger("flexbert.train")


def instantiate_all(node: DictConfig | None) -> list[Any]:
    """Every `_target_` entry of a group node (callbacks, loggers); null entries are skipped."""
    return [instantiate_node(v) for v in (node or {}).values() if v is not None]


def instantiate_node(node: DictConfig) -> Any:
    """hydra's `instantiate`, with a ConfigError the target raises passed on as it is (Hydra
    wraps it in an InstantiationException, which run_app would show as a traceback)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


# in the trainer node, not composer.Trainer's
FLEXBERT_TRAINER_KEYS = ("compile_layers", "activation_checkpointing")


# composer.Trainer arguments FlexBERT fills in itself, and where the config sets them
SET_BY_FLEXBERT = {
    "model": "the model group (model=...)",
    "train_dataloader": "the data group",
    "eval_dataloader": "the data group",
    "optimizers": "the optimizer group",
    "schedulers": "the scheduler group",
    "callbacks": "the callbacks group (+callbacks.<name>=...)",
    "algorithms": "the algorithms group",
    "loggers": "the logger group",
    "save_folder": "the run directory: checkpoints go to <run dir>/checkpoints (hydra.run.dir=...)",
    "run_name": "the top-level run_name",
    "seed": "the top-level seed",
}

# composer.Trainer arguments given as durations ("800ba", "1ep", "0.5dur", "1000000tok")
TIME_KEYS = ("max_duration", "eval_interval", "save_interval", "console_log_interval")


def check_trainer_node(trainer: DictConfig) -> None:
    """Refuse, before any data is prepared, a `trainer` key that composer.Trainer does not
    take and a duration it cannot read, naming what would be valid."""
    import difflib
    import inspect

    from composer import Trainer
    from composer.core import Time

    valid = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    valid |= set(FLEXBERT_TRAINER_KEYS)
    for key in trainer:
        if key in SET_BY_FLEXBERT:
            raise ConfigError(
                f"trainer.{key} is set by FlexBERT from {SET_BY_FLEXBERT[key]}; drop it here"
            )
        if key not in valid:
            close = difflib.get_close_matches(str(key), sorted(valid), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(
                f"trainer.{key} is not a composer.Trainer argument nor one of FlexBERT's "
                f"{list(FLEXBERT_TRAINER_KEYS)}{hint}"
            )
    for key in TIME_KEYS:
        value = trainer.get(key)
        if isinstance(value, str):
            try:
                Time.from_timestring(value)
            except ValueError:
                raise ConfigError(
                    f"trainer.{key}={value!r} is not a duration: give a number and a unit, "
                    "e.g. 800ba (batches), 2ep (epochs), 1000000tok (tokens), 1000sp "
                    "(samples) or 0.5dur (a fraction of max_duration)"
                ) from None


# Settings read as numbers by both entry points (where a node holds them): a string there
# would fail deep inside (or blame the data), so they are checked once, by name, at entry.
INTEGER_KEYS = (
    "seed",
    "data.seq_len",
    "data.max_seq_len",
    "data.batch_size",
    "data.micro_batch_size",
    "data.eval_micro_batch_size",
    "data.eval_batch_size",
    "task.num_labels",
)
NUMBER_KEYS = ("optimizer.lr", "optimizer.weight_decay", "data.mlm_probability")


def absolute_if_local(path: str | Path) -> str:
    """A path for summary.json that still holds from another directory: absolute when it
    exists here, as given otherwise (a Hub id, a remote URL)."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


def check_per_task(cfg: DictConfig) -> None:
    """A recipe's `per_task` table (conf/recipe/) must have a row for the chosen task."""
    table = cfg.get("per_task")
    name = OmegaConf.select(cfg, "task.name", default=None)
    if table is not None and name not in table:
        raise ConfigError(
            f"the recipe has settings for the tasks {sorted(table)}, not for task {name!r}: "
            "pick one of those, or drop the recipe and set optimizer.lr, "
            "optimizer.weight_decay and trainer.max_duration yourself"
        )


def check_config(cfg: DictConfig) -> None:
    """Every check that needs no data, before anything is prepared or written: the recipe's
    row for the task, the trainer's keys and durations, the numbers' types."""
    check_per_task(cfg)  # first: the number checks resolve the recipe's interpolations
    check_trainer_node(cfg.trainer)
    if "device_train_microbatch_size" in cfg.trainer and "micro_batch_size" in cfg.get("data", {}):
        raise ConfigError(
            "trainer.device_train_microbatch_size is set by FlexBERT from data.micro_batch_size "
            "(rows per microbatch, all ranks together); set that instead"
        )
    check_number_keys(cfg)


def check_number_keys(cfg: DictConfig) -> None:
    """Refuse `data.batch_size=abc`, `optimizer.lr=fast` and the like, naming the key."""
    for key in (*INTEGER_KEYS, *NUMBER_KEYS):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        integer = key in INTEGER_KEYS
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"{key} must be {kind}, got {value!r}")


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The `trainer` node as composer.Trainer keyword arguments."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {
        k: v
        for k, v in kwargs.items()
        if k not in FLEXBERT_TRAINER_KEYS and not (k == "compile_config" and v is None)
    }


def prepare_layers(cfg: DictConfig, model: Any) -> None:
    """The trainer node's layer options, applied to `model` in place:
    `activation_checkpointing=true` recomputes each layer's activations in the backward;
    `compile_layers=true` torch.compiles every encoder layer (dynamic shapes)."""
    if cfg.trainer.get("activation_checkpointing"):
        fsdp = "trainer.parallelism_config.fsdp.activation_checkpointing"
        if OmegaConf.select(cfg, fsdp):
            raise ConfigError(
                f"trainer.activation_checkpointing and {fsdp} are both true: every layer would "
                "be recomputed twice; keep trainer.activation_checkpointing (it also works "
                "inside compiled layers) and drop the FSDP one"
            )
        model.set_activation_checkpointing(True)
    if cfg.trainer.get("compile_layers"):
        model.compile_layers(dynamic=True)
    check_backend_trains_here(cfg, model)


def check_backend_trains_here(cfg: DictConfig, model: Any) -> None:
    """FlexAttention has no backward pass on the CPU: refuse a CPU training run with backend
    'flex' now, not at its first backward."""
    import torch

    name = model.config.backend.name
    device = cfg.trainer.get("device") or ("gpu" if torch.cuda.is_available() else "cpu")
    if name == "flex" and device == "cpu" and not cfg.get("eval_only"):
        # flexbert-finetune takes the model's settings from model.path, changed by overrides
        fix = "+model.overrides.backend=sdpa" if "overrides" in cfg.model else "model/backend=sdpa"
        raise ConfigError(
            "backend flex cannot train on the CPU (FlexAttention has no CPU backward); "
            f"set {fix} (or auto) here, or trainer=gpu on a GPU"
        )


def composer_trainer(
    cfg: DictConfig,
    run_dir: Path,
    model: Any,
    train_dataloader: Any,
    evaluator: Any,
    callbacks: list[Any],
    **trainer_args: Any,
) -> Any:
    """A `composer.Trainer` from a run's config: optimizer, scheduler, the `callbacks`,
    `algorithms` and `logger` groups (plus the run's own `callbacks`), checkpoints in
    run_dir/checkpoints.
    `trainer_args` are the remaining Trainer keywords (usually from `trainer_kwargs`)."""
    from composer import Trainer

    from flexbert.train import continue_from
    from flexbert.train.loggers import build_loggers, log_config_to_wandb
    from flexbert.train.optim import build_optimizer

    optimizer = build_optimizer(cfg.optimizer, model, cfg.trainer.get("device") or "cpu")
    fresh = continue_from.fresh_hyperparameters(optimizer)
    trainer_args.update(continue_from.trainer_load_kwargs(cfg))
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        eval_dataloader=evaluator,
        optimizers=optimizer,
        schedulers=instantiate_node(cfg.scheduler),
        callbacks=[*instantiate_all(cfg.get("callbacks")), *callbacks],
        algorithms=instantiate_all(cfg.get("algorithms")),
        loggers=build_loggers(cfg, run_dir),
        save_folder=str(run_dir / "checkpoints"),
        run_name=cfg.get("run_name") or run_dir.name,
        seed=cfg.seed,
        **trainer_args,
    )
    done = continue_from.apply(trainer, cfg, fresh)
    if done:
        log.info(
            "continue_from %s: its weights and optimizer moments, this config's optimizer "
            "settings (lr %s, was %s), starting at batch %d",
            done["path"],
            done["lr"],
            done["checkpoint_lr"],
            done["start_batch"],
        )
    log_config_to_wandb(trainer, cfg)
    return trainer


def finish_run(trainer: Any, run_dir: Path, summary: dict[str, Any], main: bool) -> None:
    """Write summary.json (rank 0 only), close the trainer and let its state be collected."""
    import json

    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    trainer.close()
    release_closed_trainers()


def release_closed_trainers() -> None:
    """Let closed trainers be garbage collected. Composer registers each engine's close with
    `atexit`, holding its state (model, optimizer, dataloaders) until the process exits, and
    `close()` does not take it back: a notebook or test session that trains many times kept
    every model. `atexit` unregisters by function (every engine's at once, as Composer's own
    `Engine.__del__` does), so the engines still open are registered again."""
    import atexit
    import gc

    from composer.core.engine import Engine

    atexit.unregister(Engine._close)
    for engine in gc.get_objects():
        if issubclass(type(engine), Engine) and not engine._is_closed:
            atexit.register(Engine._close, engine.state, engine.logger)


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

        try:  # the task checks the config first (check_config), as Python callers get it
            return task(cfg, Path(HydraConfig.get().runtime.output_dir))
        except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    register_overlays()
    hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(
        hydra_task
    )()
