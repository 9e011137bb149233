"""`flexbert-export`: a Composer training checkpoint -> a Hugging Face ModernBERT directory.

    flexbert-export runs/pretrain/<time>/checkpoints/ep0-ba400-rank0.pt --out my-model
    flexbert-export runs/finetune/<task>/<time>/checkpoints/ep1-ba80-rank0.pt --out my-classifier

The model config comes from the run directory (`model_config.json`, written by flexbert-train
and flexbert-finetune before training) or `--config` (a model_config.json or a run's
summary.json); the tokenizer from `--tokenizer`, the run's `tokenizer/` or the one its
summary.json names (with none, nothing is written: AutoTokenizer could not load the result);
the task head and its label names from `--config`'s summary.json or the run's `task.json`.
The result loads with `AutoModelForMaskedLM` (or the task's Auto class, or sentence-transformers
for retrieval; `flexbert.FlexBertForColBERT.from_pretrained` or PyLate for colbert) and
`AutoTokenizer`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def export(
    checkpoint: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `out` (config.json, model.safetensors, tokenizer files); return it. `checkpoint`
    may also be a run folder (or its checkpoints/): its newest checkpoint. A non-empty `out`
    is refused unless `overwrite`."""
    from flexbert import ConfigError
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.checkpoints import (
        config_next_to,
        find_run_checkpoint,
        load_checkpoint_model,
        read_model_config,
        run_task,
        run_tokenizer,
        task_model_class,
    )
    from flexbert.train.finetune_model import save_task_model
    from flexbert.train.model_config import check_tokenizer_fits

    ckpt = Path(checkpoint).resolve()
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    if ckpt.is_dir():  # a run folder, or its checkpoints/: the newest checkpoint
        found = find_run_checkpoint(ckpt.parent if ckpt.name == "checkpoints" else ckpt)
        if found is None:
            raise ConfigError(f"{ckpt} is a Hugging Face directory already: nothing to export")
        ckpt = found.checkpoint
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a directory (new or empty) instead")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out {out} is not empty: export into a new directory, or pass --overwrite to "
            "replace the model files in it"
        )
    cfg_path = Path(config) if config else config_next_to(ckpt)
    if not cfg_path.exists():
        raise FileNotFoundError(f"--config {cfg_path}: no such file")
    tok_path = Path(tokenizer) if tokenizer else run_tokenizer(ckpt, cfg_path)
    if tok_path is None:
        raise ConfigError(
            f"no tokenizer for {ckpt}: no tokenizer/ in its run folder and none named by a "
            "summary.json; pass --tokenizer DIR (the tokenizer the run trained with)"
        )
    task = run_task(ckpt, cfg_path)
    model_class = task_model_class(task.get("type"))
    model = load_checkpoint_model(ckpt, read_model_config(cfg_path), model_class)
    tok = load_tokenizer(tok_path)
    check_tokenizer_fits(tok, model.config)  # another run's would feed the model wrong ids
    refused = save_task_model(model, tok, Path(out), task)
    if refused:
        raise ConfigError(refused)
    return Path(out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    p = argparse.ArgumentParser(prog="flexbert-export", description=__doc__.splitlines()[0])
    p.add_argument(
        "checkpoint",
        help="Composer checkpoint (.pt) of flexbert-train or flexbert-finetune, or a run "
        "folder (its newest checkpoint)",
    )
    p.add_argument("--out", required=True, help="output directory for the Hugging Face model")
    p.add_argument("--config", default=None, help="model_config.json or summary.json of the run")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the run's)")
    p.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out directory"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flexbert-export` console script."""
    args = build_parser().parse_args(argv)
    from flexbert import ConfigError
    from flexbert.data.errors import DataError
    from flexbert.hf import CheckpointError

    try:
        out = export(args.checkpoint, args.out, args.config, args.tokenizer, args.overwrite)
    except (
        FileNotFoundError,
        ConfigError,
        DataError,
        CheckpointError,
        KeyError,
        RuntimeError,
    ) as e:
        print(f"flexbert-export: error: {e}", file=sys.stderr)
        return 2
    print(f"flexbert-export: {args.checkpoint} -> {out}")
    print(f"  {auto_class(out)}.from_pretrained('{out}')")
    return 0


def auto_class(hf_dir: str | Path) -> str:
    """The transformers Auto class that loads this saved model, from its architecture."""
    from flexbert.colbert_settings import COLBERT_SETTINGS_FILE

    if (Path(hf_dir) / COLBERT_SETTINGS_FILE).exists():  # the encoder + a ColBERT projection
        return "flexbert.FlexBertForColBERT"
    arch = json.loads((Path(hf_dir) / "config.json").read_text())["architectures"][0]
    return {"ModernBertModel": "AutoModel"}.get(arch, arch.replace("ModernBert", "AutoModel"))


if __name__ == "__main__":
    sys.exit(main())
