"""Run files and reading trained weights back: Composer checkpoints and HF directories.

A Composer checkpoint holds the weights; what they belong to lives in the run directory,
written before training (`write_run_files`): `model_config.json`, `tokenizer/` and, for a
fine-tuning run, `task.json` (task type and label names). These are found next to a
checkpoint or one folder up. `find_run_checkpoint` / `load_pretrained` let a task model start
from such a checkpoint (or a whole run folder) as well as from a Hugging Face directory: the
way to fine-tune an ablated model that has no Hugging Face form.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TASK_FILE = "task.json"


def write_run_files(
    run_dir: Path, model_cfg: Any, tokenizer: Any, task: dict[str, Any] | None = None
) -> None:
    """What export and resumption need, written before training so any checkpoint is usable."""
    from flexbert.data.tokenizer import save_tokenizer

    (run_dir / "model_config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2) + "\n")
    save_tokenizer(tokenizer, run_dir / "tokenizer")
    if task is not None:
        (run_dir / TASK_FILE).write_text(json.dumps(task, indent=2) + "\n")


def check_run_dir(run_dir: Path, model_cfg: Any, trainer: Any) -> None:
    """Refuse, before any run file is written, to start in a folder that already holds
    checkpoints, unless resuming them (`trainer.autoresume`, or `trainer.load_path` of one of
    them) or replacing them (`trainer.save_overwrite`) with the same model: rewriting its model_config.json for
    another model would leave those checkpoints unreadable."""
    from flexbert.registry import ConfigError

    found = last_checkpoint(run_dir)
    if found is None:
        return
    saved_path = run_dir / "model_config.json"
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        ours = json.loads(json.dumps(model_cfg.to_dict()))  # tuples -> lists, as saved
        changed = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {ours.get(k)!r}" for k in changed[:4])
            raise ConfigError(
                f"{run_dir} holds checkpoints ({found.name}) of another model ({diff}); "
                "start this run in a new folder (hydra.run.dir=...)"
            )
    load = trainer.get("load_path")
    resumes_here = bool(load) and Path(str(run_dir)).resolve() in Path(str(load)).resolve().parents
    if not (trainer.get("autoresume") or trainer.get("save_overwrite") or resumes_here):
        raise ConfigError(
            f"{run_dir} already holds checkpoints ({found.name}): resume them with "
            "trainer.autoresume=true, replace them with trainer.save_overwrite=true, or start "
            "in a new folder (hydra.run.dir=...)"
        )


def task_model_class(task_type: str | None) -> type:
    """The FlexBERT class a run trains: the MLM for pretraining, the task head otherwise."""
    import flexbert

    classes = {
        None: flexbert.FlexBertForMaskedLM,
        "sequence_classification": flexbert.FlexBertForSequenceClassification,
        "regression": flexbert.FlexBertForSequenceClassification,
        "token_classification": flexbert.FlexBertForTokenClassification,
        "multiple_choice": flexbert.FlexBertForMultipleChoice,
        "question_answering": flexbert.FlexBertForQuestionAnswering,
        "retrieval": flexbert.FlexBertForSentenceEmbedding,
        "colbert": flexbert.FlexBertForColBERT,
    }
    if task_type not in classes:
        from flexbert import ConfigError

        known = sorted(t for t in classes if t)
        raise ConfigError(f"task.type: unknown task type {task_type!r}; known: {known}")
    return classes[task_type]


CHECKPOINT_NAME = r"ep(\d+)-ba(\d+)-rank0\.pt"  # Composer's default, on rank 0


def last_checkpoint(run_dir: Path) -> Path | None:
    """The rank-0 Composer checkpoint a run saved last: the one its `latest-rank0.pt` link
    names (a rerun with trainer.save_overwrite=true that stopped earlier leaves the earlier
    run's later checkpoints beside it), else the newest by epoch and batch (as numbers: ep0-ba10
    comes after ep0-ba9), or None."""
    folder = Path(run_dir) / "checkpoints"
    latest = (folder / "latest-rank0.pt").resolve()
    if latest.is_file() and re.fullmatch(CHECKPOINT_NAME, latest.name):
        return latest
    found = []
    for path in folder.glob("ep*-ba*-rank0.pt"):
        match = re.fullmatch(CHECKPOINT_NAME, path.name)
        if match:
            found.append((int(match[1]), int(match[2]), path))
    return max(found)[2] if found else None


def find_run_file(checkpoint: Path, name: str) -> Path | None:
    """`name` in the checkpoint's run directory (the checkpoint's folder or the one above)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / name).exists():
            return folder / name
    return None


def read_model_config(path: Path) -> Any:
    """A ModelConfig from model_config.json, or from a run's summary.json (`model_config`),
    with an attention backend that runs on this machine (`backend_for_here`)."""
    from flexbert import ModelConfig

    values = json.loads(path.read_text())
    return backend_for_here(ModelConfig.from_dict(values.get("model_config", values)))


def backend_for_here(config: Any) -> Any:
    """A saved config whose attention backend cannot run here (varlen or flash_attn from a
    GPU run, read on a CPU machine to export or fine-tune) gets `auto` instead, with a
    warning: every backend computes the same attention, so the weights mean the same."""
    import logging

    from flexbert.attention.backends import BACKENDS
    from flexbert.registry import ConfigError

    try:
        BACKENDS.build(config.backend).check(config)
    except ConfigError as err:
        logging.getLogger("flexbert").warning("%s; using backend 'auto' here instead", err)
        return config.replace(backend="auto")
    return config


def read_checkpoint_weights(
    checkpoint: str | Path, label: str, mmap: bool = False
) -> dict[str, Any]:
    """The model weights (`state.model`) of a Composer checkpoint; a file that is not one
    (corrupt, truncated, another format) is a CheckpointError that starts with `label`."""
    from flexbert.hf import CheckpointError

    try:
        blob = torch.load(str(checkpoint), map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways
        raise CheckpointError(
            f"{label} could not be read as a Composer checkpoint ({type(e).__name__}: "
            f"{e}); it may be truncated or corrupt: use another of the run's checkpoints"
        ) from e
    weights = blob.get("state", {}).get("model") if isinstance(blob, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(
            f"{label} is not a Composer checkpoint (no state.model weights): expected a "
            "flexbert-train / flexbert-finetune checkpoints/ep<N>-ba<M>-rank0.pt"
        )
    return weights


def load_checkpoint_model(
    checkpoint: str | Path, config: Any, model_class: type | None = None
) -> Any:
    """`model_class` (default FlexBertForMaskedLM) with the weights of a Composer checkpoint
    of one of FlexBERT's Composer wrappers. A file that is not one (corrupt, truncated, another
    format) or whose weights do not fit `config` is a CheckpointError naming the file."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    from flexbert.hf import CheckpointError
    from flexbert.registry import ConfigError

    state = dict(read_checkpoint_weights(checkpoint, str(checkpoint)))
    consume_prefix_in_state_dict_if_present(state, "module.")  # DDP
    consume_prefix_in_state_dict_if_present(state, "model.")  # the wrapper's .model
    model_class = model_class or task_model_class(None)
    # a head whose shape is not all in the model config (ColBERT) reads the rest from the state
    settings_of = getattr(model_class, "settings_from_state_dict", None)
    try:
        model = model_class(config, **(settings_of(state) if settings_of else {}))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ConfigError) as e:
        raise CheckpointError(
            f"the weights in {checkpoint} do not fit a {model_class.__name__} of the run's "
            f"model config (a checkpoint from another model or run? a fine-tuning checkpoint "
            f"is read with its run's task: task.json beside it, or its summary.json as the "
            f"config): {str(e)[:600]}"
        ) from e
    return model.eval()


def check_checkpoint_fits(path: str | Path, model: Any, setting: str) -> None:
    """Refuse, before Composer loads it, a local checkpoint named by `setting` that is missing
    or whose weights do not fit `model` (the Composer model the run built): the names and
    shapes that differ, instead of a wall of load_state_dict errors. Remote URIs, per-rank
    name patterns, sharded directories and compressed files are left to Composer, as is a
    deliberately partial load (trainer.load_strict_model_weights=false)."""
    from flexbert.hf import CheckpointError
    from flexbert.registry import ConfigError

    text = str(path)
    local = Path(text).expanduser()
    if local.is_dir() and any((local / m).exists() for m in RUN_MARKERS):
        newest = last_checkpoint(local)
        raise ConfigError(
            f"{setting}={text} is a run folder; Composer loads one checkpoint file: "
            + (f"give its newest, {newest}" if newest else "this run saved none in checkpoints/")
        )
    if "://" in text or "{" in text or local.is_dir() or not text.endswith(".pt"):
        return  # remote, per-rank, FSDP-sharded or compressed: Composer reads those itself
    if not Path(text).is_file():
        raise ConfigError(f"{setting}={text}: no such checkpoint file")
    saved = read_checkpoint_weights(text, f"{setting}={text}", mmap=True)

    def shapes_of(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        plain = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(plain, "module.")  # DDP
        return plain

    ours, theirs = shapes_of(model.state_dict()), shapes_of(saved)
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    shapes = [
        f"{k} {theirs[k]} vs {ours[k]}"
        for k in sorted(set(ours) & set(theirs))
        if theirs[k] != ours[k]
    ]
    found = [
        f"{len(shapes)} of other shapes (checkpoint vs this model: {shapes[:3]})" if shapes else "",
        f"{len(missing)} missing ({missing[:3]})" if missing else "",
        f"{len(extra)} not in this model ({extra[:3]})" if extra else "",
    ]
    if any(found):
        raise CheckpointError(
            f"{setting}={text} holds another model's weights: "
            + "; ".join(f for f in found if f)
            + ". Use a checkpoint of this model's size and components, or init_from.path to "
            "grow a smaller model into this one"
        )


def config_next_to(checkpoint: Path) -> Path:
    """The run's model_config.json for a checkpoint, or a FileNotFoundError saying what to pass."""
    path = find_run_file(checkpoint, "model_config.json")
    if path is None:
        raise FileNotFoundError(
            f"no model_config.json next to {checkpoint} or its parent; pass the config "
            "(a run's model_config.json or summary.json)"
        )
    return path


# What makes a folder a flexbert-train / flexbert-finetune run directory.
RUN_MARKERS = ("summary.json", "model_config.json", "checkpoints")
VALID_SOURCES = (
    "a Hugging Face ModernBERT directory (config.json) or Hub id 'org/name', a flexbert-train "
    "or flexbert-finetune run folder (summary.json, checkpoints/, tokenizer/) or one of its "
    "Composer checkpoints (checkpoints/ep<N>-ba<M>-rank0.pt)"
)


@dataclass
class RunCheckpoint:
    """A Composer checkpoint and the run files that say what it holds."""

    checkpoint: Path
    config: Path  # model_config.json or summary.json
    tokenizer: Path | None  # the run's tokenizer directory, when one is found
    task_type: str | None  # None: a pretraining (MLM) checkpoint


def read_summary(path: Path | None) -> dict[str, Any]:
    """A run's summary.json as a dict; {} for None or a model_config.json."""
    if path is None:
        return {}
    values = json.loads(Path(path).read_text())
    return values if "model_config" in values else {}


def run_tokenizer(checkpoint: Path, summary: Path | None = None) -> Path | None:
    """The tokenizer of a checkpoint's run: its `tokenizer/` folder, else one that `summary`
    or the run's summary.json names (`paths.tokenizer`, `data.tokenizer`) or holds beside it,
    when that exists here; None when there is none."""
    found = find_run_file(checkpoint, "tokenizer")
    if found is not None:
        return found
    for path in (summary, find_run_file(checkpoint, "summary.json")):
        values = read_summary(path)
        named = [(values.get(k) or {}).get("tokenizer") for k in ("paths", "data")]
        candidates = [Path(path).parent / "tokenizer"] if values else []
        for candidate in [*candidates, *(Path(n) for n in named if n)]:
            if candidate.exists():
                return candidate
    return None


def run_task(checkpoint: Path, summary: Path | None = None) -> dict[str, Any]:
    """What a checkpoint was fine-tuned for ({"type", "labels", ...}): the `task` of `summary`
    when given, else the run's task.json, else its summary.json; {} for pretraining."""
    task = read_summary(summary).get("task")
    if not task:
        task_file = find_run_file(checkpoint, TASK_FILE)
        task = json.loads(task_file.read_text()) if task_file else None
    if not task:
        task = read_summary(find_run_file(checkpoint, "summary.json")).get("task")
    return task if isinstance(task, dict) else {}


def find_run_checkpoint(path: str | Path) -> RunCheckpoint | None:
    """What `path` names when it is a Composer checkpoint (.pt), a run folder (its newest
    checkpoint) or a run's summary.json; None for a Hugging Face directory or a Hub id.
    Anything else is a FileNotFoundError that lists what would be valid."""
    local = Path(path).expanduser()
    if local.is_dir() and any((local / f).exists() for f in ("config.json", "modules.json")):
        return None  # a Hugging Face (or sentence-transformers) directory
    if local.is_file() and local.name == "summary.json":
        local = local.parent
    if local.is_file() and local.suffix == ".pt":
        checkpoint = local.resolve()  # latest-rank0.pt is a link to the newest checkpoint
    elif local.is_dir() and any((local / m).exists() for m in RUN_MARKERS):
        checkpoint = last_checkpoint(local)
        if checkpoint is None:
            raise FileNotFoundError(
                f"{local}: this run folder has no Composer checkpoint in checkpoints/ "
                "(ep<N>-ba<M>-rank0.pt); did the run save one (trainer.save_interval)?"
            )
    elif local.exists():
        raise FileNotFoundError(f"{local} is not a model: expected {VALID_SOURCES}")
    elif local.suffix in (".pt", ".json"):
        raise FileNotFoundError(f"{local}: no such file; expected {VALID_SOURCES}")
    elif (local.parent / "summary.json").is_file():  # e.g. <run>/hf of a run that skipped it
        paths = json.loads((local.parent / "summary.json").read_text()).get("paths") or {}
        why = f" (the run skipped it: {paths['hf_skipped']})" if paths.get("hf_skipped") else ""
        raise FileNotFoundError(
            f"{local}: no such directory{why}; give the run folder {local.parent} (its newest "
            "checkpoint and tokenizer are used) or one of its checkpoints/*.pt"
        )
    else:
        return None  # a Hub id, or a missing directory that resolve_model_dir reports
    config = find_run_file(checkpoint, "model_config.json") or find_run_file(
        checkpoint, "summary.json"
    )
    if config is None:
        raise FileNotFoundError(
            f"no model_config.json or summary.json next to {checkpoint} or its parent: "
            "keep the checkpoint inside its run folder"
        )
    return RunCheckpoint(
        checkpoint, config, run_tokenizer(checkpoint), run_task(checkpoint).get("type")
    )


def load_pretrained(path: str | Path, model_class: type, **overrides: Any) -> Any:
    """`model_class` (a task head, the MLM, the embedding model) over the trained encoder in
    `path`: a Hugging Face directory or Hub id (`from_hf`), or a run checkpoint
    (`find_run_checkpoint`), which also carries models that have no Hugging Face form
    (rmsnorm, absolute or no positions). `overrides` are ModelConfig fields (num_labels, ...);
    weights are matched as `from_hf` matches them: a head the source lacks starts fresh, and
    from a fine-tuning run every weight of the same shape is kept, the output layer of another
    label count (MNLI's 3 classes into RTE's 2, the paper's protocol) starting fresh, from a
    run or its Hugging Face export alike."""
    from flexbert.hf import match_state_dict

    run = find_run_checkpoint(path)
    if run is None:  # a fine-tuned Hugging Face export too: a head of another shape is new
        return model_class.from_hf(path, ignore_mismatched_sizes=True, **overrides)
    config = read_model_config(run.config)
    source = load_checkpoint_model(run.checkpoint, config, task_model_class(run.task_type))
    model = model_class(config.replace(**overrides))
    state = match_state_dict(model, source.state_dict(), refit_head=run.task_type is not None)
    model.load_state_dict(state, strict=False)
    return model


def load_pretrained_mlm(path: str | Path) -> Any:
    """A trained FlexBertForMaskedLM from a Hugging Face ModernBERT directory or Hub id, a
    flexbert-train run folder or one of its Composer checkpoints (`load_pretrained`)."""
    from flexbert import FlexBertForMaskedLM

    return load_pretrained(path, FlexBertForMaskedLM).eval()


def init_from(node: Any, model: Any) -> dict[str, Any] | None:
    """Apply the `init_from` config node to a freshly built model: load the trained source
    and grow it into `model` (a plain copy when the sizes match). Returns what was done, for
    the run summary, or None when `init_from.path` is unset."""
    from flexbert import ConfigError, grow_model

    if not node or not node.get("path"):
        return None
    source = load_pretrained_mlm(node["path"])
    tile_mode, layer_map = node.get("tile_mode", "middle"), node.get("layer_map", "gopher")
    try:
        grown = grow_model(model, source, tile_mode=tile_mode, layer_map=layer_map)
    except ConfigError as err:
        hint = (
            "; train with the source's tokenizer (data.tokenizer.path=<its directory or Hub id>)"
            if "vocab_size" in str(err)
            else ""
        )
        raise ConfigError(f"init_from.path={node['path']}: {err}{hint}") from None
    s, t = source.config, model.config
    return {
        "path": str(node["path"]),
        "tile_mode": tile_mode,
        "layer_map": layer_map,
        "source_shape": [s.num_layers, s.hidden_size, s.intermediate_size],
        "target_shape": [t.num_layers, t.hidden_size, t.intermediate_size],
        "source_layer_of_each_layer": grown.layer_map,
        "copied": len(grown.copied),
        "kept_init": grown.kept_init,
        "dropped": grown.dropped,
    }
