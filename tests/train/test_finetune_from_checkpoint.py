"""flexbert-finetune from a flexbert-train run folder or Composer checkpoint: ablated models
(here rmsnorm) have no Hugging Face form, so their runs have no hf/ and fine-tuning reads the
checkpoint and the run's tokenizer instead, and saves what it can."""

from __future__ import annotations

import json

import pytest
import torch

from flexbert.train.finetune import report, train
from tests.train.conftest import SHORT_RUN, TINY_RUN, compose_config
from tests.train.finetune_helpers import FAST, compose_finetune, file_overrides, finetune_error_line


@pytest.fixture(scope="module")
def ablated_run(tmp_path_factory):
    """A 2-batch rmsnorm pretraining run: checkpoints/ and tokenizer/, but no hf/."""
    from flexbert.train.pretrain import train as pretrain

    root = tmp_path_factory.mktemp("ablated")
    cfg = compose_config(
        [*TINY_RUN, *SHORT_RUN, f"paths.cache_dir={root / 'cache'}", "model/norm=rmsnorm"]
        + ["export_hf=true"]
    )
    summary = pretrain(cfg, root / "run")
    assert summary["paths"]["hf"] is None and "rmsnorm" in summary["paths"]["hf_skipped"]
    return root / "run", summary


@pytest.mark.parametrize("source", ["run folder", "checkpoint file"])
def test_an_ablated_model_fine_tunes_from_its_run(
    ablated_run,
    contains_word,
    tmp_path,
    source,
):
    from flexbert import FlexBertForSequenceClassification
    from flexbert.train.checkpoints import load_checkpoint_model, read_model_config

    run, pretrain_summary = ablated_run
    checkpoint = pretrain_summary["paths"]["last_checkpoint"]
    path = run if source == "run folder" else checkpoint
    cfg = compose_finetune(
        [f"model.path={path}", *file_overrides(contains_word), *FAST, "trainer.max_duration=1ep"]
    )
    summary = train(cfg, tmp_path / "ft")

    assert summary["pretrained"] == {"path": str(path), "checkpoint": checkpoint}
    assert summary["data"]["tokenizer"] == str(run / "tokenizer")  # the run's own tokenizer
    assert summary["model_config"]["norm"]["name"] == "rmsnorm"
    assert summary["train"]["batches"] > 0
    # no hf/: said why, in the summary and the closing message, instead of crashing
    paths = summary["paths"]
    assert paths["hf"] is None and "rmsnorm" in paths["hf_skipped"]
    assert not (tmp_path / "ft" / "hf").exists()
    on_disk = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert on_disk["paths"]["hf_skipped"] == paths["hf_skipped"]
    text = report(summary)
    assert "not exported: " in text and "rmsnorm" in text and "load_checkpoint_model" in text
    # the fine-tuned checkpoint is what it saved: it loads back as the task model
    model = load_checkpoint_model(
        paths["last_checkpoint"],
        read_model_config(tmp_path / "ft" / "model_config.json"),
        FlexBertForSequenceClassification,
    )
    assert model.config.norm.name == "rmsnorm" and model.config.num_labels == 2


def test_the_task_model_starts_from_the_checkpoints_encoder(ablated_run):
    from omegaconf import OmegaConf

    from flexbert.train.checkpoints import load_checkpoint_model, read_model_config
    from flexbert.train.finetune_model import load_task_model

    run, summary = ablated_run
    mlm = load_checkpoint_model(
        summary["paths"]["last_checkpoint"], read_model_config(run / "model_config.json")
    )
    for task in ({"type": "sequence_classification", "num_labels": 3}, {"type": "retrieval"}):
        cfg = OmegaConf.create({"model": {"path": str(run), "overrides": {}}, "task": task})
        model = load_task_model(cfg)
        for key, value in mlm.model.state_dict().items():
            torch.testing.assert_close(model.model.state_dict()[key], value, rtol=0, atol=0)
    assert model.config.num_labels == mlm.config.num_labels  # retrieval keeps the config's


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("empty_dir", "is not a model: expected a Hugging Face ModernBERT directory"),
        ("run/hf", "the run skipped it: this model cannot be saved"),
        ("notes.txt", "is not a model: expected"),
        ("run/checkpoints/ep9-ba9-rank0.pt", "no such file; expected"),
    ],
)
def test_a_wrong_model_path_is_one_clear_error(
    ablated_run, tmp_path, monkeypatch, capsys, bad, expected
):
    run, _ = ablated_run
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes.txt").write_text("not a model\n")
    path = run.parent / bad if bad.startswith("run/") else tmp_path / bad
    args = [f"model.path={path}", f"hydra.run.dir={tmp_path / 'out'}"]
    last = finetune_error_line(args, monkeypatch, capsys)
    assert expected in last
    if bad == "run/hf":  # points at what to give instead
        assert f"give the run folder {run}" in last
    else:
        assert "run folder" in last and ".pt" in last


def test_a_corrupt_or_foreign_checkpoint_is_a_checkpoint_error(ablated_run, tmp_path):
    """Truncated bytes, a .pt that is not a Composer checkpoint, and weights that do not fit
    the run's model config: each one CheckpointError naming the file (run_app's one line)."""
    import shutil

    from flexbert.hf import CheckpointError
    from flexbert.train.checkpoints import (
        last_checkpoint,
        load_checkpoint_model,
        read_model_config,
    )

    run, _ = ablated_run
    good = last_checkpoint(run)
    config = read_model_config(run / "model_config.json")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pt could not be read"):
        load_checkpoint_model(truncated, config)
    foreign = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), foreign)
    with pytest.raises(CheckpointError, match="tensor.pt is not a Composer checkpoint"):
        load_checkpoint_model(foreign, config)
    with pytest.raises(CheckpointError, match="do not fit a FlexBertForMaskedLM"):
        load_checkpoint_model(good, config.replace(num_layers=config.num_layers + 1))
    from flexbert import FlexBertForColBERT  # an MLM checkpoint read as another run's head

    with pytest.raises(CheckpointError, match="do not fit a FlexBertForColBERT"):
        load_checkpoint_model(good, config, FlexBertForColBERT)
    # through flexbert-finetune: the same error, one line
    other = tmp_path / "run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("*.pt"))
    (other / "checkpoints" / good.name).write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="could not be read"):
        train(compose_finetune([f"model.path={other}", *FAST]), tmp_path / "ft")
