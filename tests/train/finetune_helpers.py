"""Helpers shared by the fine-tuning tests: tiny word-list texts, fast settings, composing
conf/finetune.yaml, and writing task files. The fixtures built from them (`pretrained`,
`contains_word`, `colbert_pairs`, `colbert_run`) are in conftest.py."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from flexbert.train.paths import compose_config

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "quick",
    "table",
    "music",
    "paper",
    "light",
    "house",
    "dream",
]
KEY = "banana"
# a ColBERT fine-tuning on the local query/positive files (`colbert_pairs`)
COLBERT = ["task=local_colbert", "task.colbert_dim=32", "task.query_length=12"]
FAST = [
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.max_seq_len=32",
    "optimizer.lr=2e-3",
    "trainer.progress_bar=false",
]


def random_sentences(rng: random.Random, n: int) -> list[list[str]]:
    return [
        [
            rng.choice([*WORDS, KEY] if rng.random() < 0.5 else WORDS)
            for _ in range(rng.randint(3, 7))
        ]
        for _ in range(n)
    ]


def compose_finetune(overrides: list[str]):
    return compose_config("finetune", overrides)


def finetune_run(overrides: list[str], folder: Path) -> tuple[Path, dict]:
    """Fine-tune as `overrides` say into folder/run: (the run folder, its summary)."""
    from flexbert.train.finetune import train

    run = folder / "run"
    return run, train(compose_finetune(overrides), run)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def file_overrides(files: dict[str, Path]) -> list[str]:
    return [f"task.dataset.files.{k}={v}" for k, v in files.items()]


def finetune_error_line(args: list[str], monkeypatch, capsys) -> str:
    """Run flexbert-finetune with `args`, expect the one-line refusal (exit 2, no traceback)
    and return that line."""
    from flexbert.train.finetune import main

    monkeypatch.setattr(sys, "argv", ["flexbert-finetune", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flexbert-finetune: error: ")
    return last
