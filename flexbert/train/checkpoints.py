"""Run files and reading trained weights back: Composer checkpoints and HF directories.

A Composer checkpoint holds the weights; what they belong to lives in the run directory,
written before training (`write_run_files`): `model_config.json`, `tokenizer/` and, for a
fine-tuning run, `task.json` (task type and label names). These are found next to a
checkpoint or one folder up.
"""

from __future__ import annotations

import json
import re
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
    }
    if task_type not in classes:
        raise ValueError(f"unknown task type {task_type!r}; known: {sorted(map(str, classes))}")
    return classes[task_type]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest rank-0 Composer checkpoint of a run (ordered by epoch and batch as numbers:
    ep0-ba10 comes after ep0-ba9), or None."""
    found = []
    for path in (Path(run_dir) / "checkpoints").glob("ep*-ba*-rank0.pt"):
        match = re.fullmatch(r"ep(\d+)-ba(\d+)-rank0\.pt", path.name)
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
    """A ModelConfig from model_config.json, or from a run's summary.json (`model_config`)."""
    from flexbert import ModelConfig

    values = json.loads(path.read_text())
    return ModelConfig.from_dict(values.get("model_config", values))


def load_checkpoint_model(
    checkpoint: str | Path, config: Any, model_class: type | None = None
) -> Any:
    """`model_class` (default FlexBertForMaskedLM) with the weights of a Composer checkpoint
    of one of FlexBERT's Composer wrappers."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    blob = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    state = dict(blob["state"]["model"])
    consume_prefix_in_state_dict_if_present(state, "module.")  # DDP
    consume_prefix_in_state_dict_if_present(state, "model.")  # the wrapper's .model
    model = (model_class or task_model_class(None))(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def config_next_to(checkpoint: Path) -> Path:
    """The run's model_config.json for a checkpoint, or a FileNotFoundError saying what to pass."""
    path = find_run_file(checkpoint, "model_config.json")
    if path is None:
        raise FileNotFoundError(
            f"no model_config.json next to {checkpoint} or its parent; pass the config "
            "(a run's model_config.json or summary.json)"
        )
    return path


def load_pretrained_mlm(path: str | Path) -> Any:
    """A trained FlexBertForMaskedLM from a flexbert-train Composer checkpoint (.pt, config
    from its run directory), a Hugging Face ModernBERT directory or a Hub id."""
    from flexbert import FlexBertForMaskedLM

    local = Path(path).expanduser().resolve()
    if local.is_file():
        return load_checkpoint_model(local, read_model_config(config_next_to(local)))
    if local.is_dir() and not (local / "config.json").exists():
        raise FileNotFoundError(
            f"{local}: expected a Hugging Face ModernBERT directory (with config.json) or a "
            "flexbert-train checkpoint file (runs/pretrain/<time>/checkpoints/ep0-ba<N>-rank0.pt)"
        )
    return FlexBertForMaskedLM.from_hf(local if local.exists() else str(path)).eval()


def init_from(node: Any, model: Any) -> dict[str, Any] | None:
    """Apply the `init_from` config node to a freshly built model: load the trained source
    and grow it into `model` (a plain copy when the sizes match). Returns what was done, for
    the run summary, or None when `init_from.path` is unset."""
    from flexbert import ConfigError, grow_model

    if not node or not node.get("path"):
        return None
    source = load_pretrained_mlm(node["path"])
    tile_mode, layer_map = node.get("tile_mode", "center"), node.get("layer_map", "gopher")
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
