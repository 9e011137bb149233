"""Continuing trained weights: new phases (continue_from, context extension), resuming a run
in its own folder, and the refusals that keep a run's checkpoints readable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from flexbert import ConfigError
from flexbert.train.checkpoints import load_checkpoint_model, read_model_config
from flexbert.train.pretrain import train


def test_a_run_resumes_in_its_own_folder_by_load_path_or_autoresume(first_run, tmp_path):
    """Resuming a run where it is stays allowed: trainer.load_path of one of its checkpoints,
    or autoresume, which also ignores a continue_from file that is gone by then."""
    from tests.train.conftest import TINY_RUN, compose_config

    root, _, _ = first_run
    run = tmp_path / "copy"
    shutil.copytree(root / "run", run)
    base = [*TINY_RUN, f"paths.cache_dir={root / 'cache'}", "export_hf=false"]
    ckpt = run / "checkpoints" / "ep0-ba6-rank0.pt"
    resume = [f"trainer.load_path={ckpt}", "trainer.max_duration=7ba", "trainer.eval_interval=0"]
    resumed = train(compose_config([*base, *resume]), run)
    assert resumed["train"]["batches"] == 7 and resumed["train"]["batches_this_run"] == 1
    # without periodic evaluation the final weights are still scored (not NaN)
    assert resumed["eval"]["LanguageCrossEntropy"] > 0
    gone = tmp_path / "phase1-deleted.pt"
    again = [
        *base,
        "trainer.autoresume=true",
        f"continue_from.path={gone}",
        "trainer.max_duration=8ba",
    ]
    assert train(compose_config(again), run)["train"]["batches"] == 8


def test_a_run_folder_with_checkpoints_is_not_rewritten_by_another_run(first_run, tmp_path):
    """Starting a run in a folder that holds checkpoints used to rewrite its model_config.json
    before Composer refused, leaving those checkpoints unreadable."""
    root, _, _ = first_run
    run = tmp_path / "copy"
    shutil.copytree(root / "run", run)
    saved = (run / "model_config.json").read_text()
    from tests.train.conftest import TINY_RUN, compose_config

    base = [*TINY_RUN, f"paths.cache_dir={root / 'cache'}"]
    with pytest.raises(ConfigError, match="holds checkpoints .* of another model .*hidden_size"):
        train(compose_config([*base, "model.hidden_size=128"]), run)
    with pytest.raises(ConfigError, match="already holds checkpoints .*trainer.autoresume=true"):
        train(compose_config(base), run)
    assert (run / "model_config.json").read_text() == saved


def _extension_config(root: Path, first: dict, *extra: str):
    """experiment=context_extension on the tiny model and phase 1's data, two 4 x 128 steps."""
    from tests.train.conftest import compose_config

    return compose_config(
        [
            "experiment=context_extension",
            "model/size=tiny",
            "trainer=cpu",
            f"data.tokenizer.path={root / 'run' / 'tokenizer'}",
            f"data.mds.dir={first['data']['mds_dir']}",
            "data.seq_len=128",
            "data.batch_size=4",
            "data.micro_batch_size=2",
            "data.eval_micro_batch_size=4",
            "data.progress=false",
            "model.attention_pattern.window=16",
            "trainer.max_duration=1024tok",  # two steps of 4 x 128 tokens
            "trainer.eval_interval=2ba",
            "trainer.eval_subset_num_batches=1",
            "trainer.progress_bar=false",
            "callbacks.speed_monitor=null",
            "export_hf=false",
            *extra,
        ]
    )


def _optimizer_state(checkpoint: str) -> tuple[list[dict], dict]:
    blob = torch.load(checkpoint, map_location="cpu", weights_only=False)
    (saved,) = blob["state"]["optimizers"].values()
    return saved["param_groups"], saved["state"]


def test_context_extension_continues_phase_one_with_its_moments_and_new_settings(
    first_run, tmp_path
):
    """experiment=context_extension with continue_from: phase 1's weights and optimizer moments,
    the recipe's lr / weight decay / schedule (not phase 1's), the clock and data from zero, at
    twice the sequence length with the recipe's global RoPE theta."""
    from flexbert.train.pretrain import build_trainer

    root, _, first = first_run
    ckpt = first["paths"]["last_checkpoint"]
    cfg = _extension_config(
        root, first, f"continue_from.path={ckpt}", "optimizer.lr=2e-3", "optimizer.weight_decay=0.5"
    )
    trainer, _ = build_trainer(cfg, tmp_path / "extended")
    assert int(trainer.state.timestamp.batch) == 0  # a new clock
    optimizer = trainer.state.optimizers[0]
    old_groups, old_state = _optimizer_state(ckpt)
    assert old_groups[0]["lr"] != 2e-3 and old_groups[0]["weight_decay"] != 0.5
    decayed, plain = optimizer.param_groups
    assert (decayed["lr"], decayed["initial_lr"], decayed["max_lr"]) == (2e-3, 2e-3, 2e-3)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.5, 0.0)  # no_decay kept
    assert trainer.state.schedulers[0].base_lrs == [2e-3, 2e-3]
    assert int(decayed["step"]) == int(old_groups[0]["step"]) > 0  # the moments' step count
    moments = [optimizer.state[p]["exp_avg"] for p in decayed["params"]]
    saved = [v["exp_avg"] for v in old_state.values()]
    assert any(m.abs().sum() > 0 for m in moments)
    assert {round(float(m.abs().sum()), 6) for m in moments} <= {
        round(float(m.abs().sum()), 6) for m in saved
    }  # every moment is one of phase 1's, not a fresh zero
    trainer.close()

    summary = train(cfg, tmp_path / "extended2")
    assert summary["train"]["batches"] == 2  # a new schedule, not phase 1's batch count
    assert summary["model_config"]["position"]["global_theta"] == 160_000.0
    assert summary["train"]["tokens"] == 2 * 4 * 128
    groups, _ = _optimizer_state(summary["paths"]["last_checkpoint"])
    assert groups[0]["lr"] == pytest.approx(2e-3) and groups[0]["weight_decay"] == 0.5
    assert int(groups[0]["step"]) == int(old_groups[0]["step"]) + 2  # counted on, not reset
    before = load_checkpoint_model(ckpt, read_model_config(root / "run" / "model_config.json"))
    after = load_checkpoint_model(
        summary["paths"]["last_checkpoint"],
        read_model_config(tmp_path / "extended2" / "model_config.json"),
    )
    moved = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())]
    assert any(moved)  # it trained on from phase 1's weights


def test_continue_from_without_reset_time_keeps_the_clock_and_data_position(first_run, tmp_path):
    """continue_from.reset_time=false (the large model's restart at a lower lr): the
    checkpoint's batch count and data position go on, with this config's learning rate."""
    root, _, first = first_run
    ckpt = root / "run" / "checkpoints" / "ep0-ba3-rank0.pt"
    from tests.train.conftest import TINY_RUN, compose_config

    cfg = compose_config(
        [
            *TINY_RUN,
            f"paths.cache_dir={root / 'cache'}",
            f"continue_from.path={ckpt}",
            "continue_from.reset_time=false",
            "optimizer.lr=1e-4",
            "scheduler.t_warmup=0ba",
            "export_hf=false",
        ]
    )
    summary = train(cfg, tmp_path / "restarted")
    assert summary["train"]["batches"] == 6 and summary["train"]["batches_this_run"] == 3
    resumed = [(s["batch"], s["tokens"]) for s in summary["train"]["loss_curve"]]
    assert resumed == [(s["batch"], s["tokens"]) for s in first["train"]["loss_curve"][3:]]
    groups, _ = _optimizer_state(summary["paths"]["last_checkpoint"])
    assert groups[0]["initial_lr"] == 1e-4


def test_a_checkpoint_of_another_model_or_none_is_refused_by_name(first_run, tmp_path):
    from flexbert.hf import CheckpointError

    root, _, first = first_run
    ckpt = first["paths"]["last_checkpoint"]
    wider = _extension_config(root, first, f"continue_from.path={ckpt}", "model.hidden_size=96")
    with pytest.raises(CheckpointError, match="continue_from.path=.*another model's weights.*96"):
        train(wider, tmp_path / "wider")
    missing = _extension_config(root, first, f"trainer.load_path={tmp_path / 'none.pt'}")
    with pytest.raises(ConfigError, match="trainer.load_path=.*no such checkpoint file"):
        train(missing, tmp_path / "missing")
    folder = _extension_config(root, first, f"continue_from.path={root / 'run'}")
    with pytest.raises(ConfigError, match="is a run folder.*give its newest, .*ep0-ba6-rank0.pt"):
        train(folder, tmp_path / "folder")
    both = _extension_config(root, first, f"continue_from.path={ckpt}", f"trainer.load_path={ckpt}")
    with pytest.raises(ConfigError, match="both set.*keep one"):
        train(both, tmp_path / "both")
