"""Where a run executes: its device, its rank among several processes, its trained model.

`start_distributed` runs first in both entry points: a GPU config on a machine without CUDA
fails in one line, and under a multi-process launcher (`composer -n N`) torch.distributed is
initialised early so local rank 0 can prepare data while the other ranks wait.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def rows_per_rank(rows: int, what: str, world_size: int) -> int:
    """Each rank's share of `data.<what>` rows; a batch the ranks cannot share evenly is
    refused (floor division would quietly train on a smaller one)."""
    from flexbert import ConfigError

    if rows % world_size:
        raise ConfigError(f"data.{what}={rows} must be divisible by the world size ({world_size})")
    return rows // world_size


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


def final_model(trainer: Any) -> Any:
    """The model a finished run exports: with Composer's EMA, the averaged weights (what its
    evaluations and checkpoints hold) are put in place of the training ones first."""
    from composer.algorithms import EMA

    for algorithm in trainer.state.algorithms:
        started = isinstance(algorithm, EMA) and algorithm.ema_model is not None
        if started and not algorithm.ema_weights_active:
            algorithm.get_ema_model(trainer.state.model)
    return trained_model(trainer)


def is_sharded(model: Any) -> bool:
    """Whether FSDP (Composer's `parallelism_config.fsdp`, FSDP1 or FSDP2) shards `model`."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, FSDPModule | FullyShardedDataParallel) for m in model.modules())


def full_model(model: Any) -> Any | None:
    """`model` as one ordinary FlexBERT module holding all its weights, on global rank 0 (what
    a Hugging Face export saves); None on the other ranks. Every rank must call it:
    under FSDP each rank holds a shard of the weights and gathering them is a collective
    (rank 0 asking alone would wait forever), and the sharded module's class is FSDP's, not
    one Hugging Face ModernBERT has."""
    if not is_sharded(model):
        return model if is_main_process() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0's, on the CPU
    state = get_model_state_dict(model, options=options)
    if not is_main_process():
        return None
    inner = getattr(model, "module", model)
    full = _unsharded_copy(model)
    full.load_state_dict(state)
    return full.train(inner.training)


def parameter_count(model: Any) -> int:
    """How many parameters `model` has in all, sharded or not, without gathering them (no
    collective: any rank may ask, each gets the same answer)."""
    import torch

    if not is_sharded(model):
        return model.num_params()
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return _unsharded_copy(model).num_params()


def _unsharded_copy(model: Any) -> Any:
    """A new module of the FlexBERT class FSDP wraps (FSDP1) or subclasses (FSDP2), built from
    the same config and arguments, on the current default device."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "module", model)
    cls = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))
    return cls(inner.config, **inner.init_kwargs())
