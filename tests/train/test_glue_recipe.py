"""conf/recipe/glue_{base,large}: the paper's GLUE rows (Appendix E.1, Table 6), picked by the
task, overridable from the command line, refused by name for a task without a row."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from flexbert.registry import ConfigError
from flexbert.train.app import check_per_task
from flexbert.train.optim import build_optimizer
from tests.train.finetune_helpers import (
    FAST,
    KEY,
    compose_finetune,
    finetune_error_line,
    random_sentences,
)

# (recipe, task): (lr, weight decay, epochs) as printed in the paper's Table 6
PAPER = {
    ("glue_base", "cola"): (8e-5, 1e-6, 5),
    ("glue_base", "mnli"): (5e-5, 5e-6, 1),
    ("glue_base", "stsb"): (8e-5, 5e-6, 10),
    ("glue_large", "sst2"): (1e-5, 1e-6, 3),
    ("glue_large", "mrpc"): (8e-5, 5e-6, 2),
    ("glue_large", "rte"): (5e-5, 8e-6, 3),
}
GLUE = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]


@pytest.mark.parametrize(("recipe", "task"), sorted(PAPER))
def test_the_task_picks_its_row_of_the_paper(recipe, task):
    cfg = compose_finetune([f"recipe={recipe}", f"task={task}"])
    lr, wd, epochs = PAPER[(recipe, task)]
    assert cfg.optimizer.lr == pytest.approx(lr)
    assert cfg.optimizer.weight_decay == pytest.approx(wd)
    assert cfg.trainer.max_duration == f"{epochs}ep"
    assert cfg.data.batch_size == 64
    assert cfg.optimizer._target_ == "optimi.AdamW" and cfg.optimizer.decouple_lr


@pytest.mark.parametrize("recipe", ["glue_base", "glue_large"])
def test_every_glue_task_has_a_row_and_wnli_none(recipe):
    for task in GLUE:
        check_per_task(compose_finetune([f"recipe={recipe}", f"task={task}"]))
    with pytest.raises(ConfigError, match=r"not for task 'wnli'.*optimizer\.lr"):
        check_per_task(compose_finetune([f"recipe={recipe}", "task=wnli"]))


def test_the_command_line_overrides_the_row():
    cfg = compose_finetune(
        ["recipe=glue_base", "task=rte", "optimizer.lr=1e-5", "trainer.max_duration=2ep"]
    )
    assert cfg.optimizer.lr == 1e-5 and cfg.trainer.max_duration == "2ep"
    assert cfg.optimizer.weight_decay == pytest.approx(1e-5)  # still the row's


def test_decoupled_weight_decay_does_not_scale_with_the_learning_rate():
    """One step with a zero gradient only decays: by weight_decay (the reference's
    DecoupledAdamW) where torch AdamW decays by lr x weight_decay."""
    node = OmegaConf.load("conf/optimizer/decoupled_adamw.yaml")
    node.weight_decay = 1e-3
    layer = torch.nn.Linear(4, 4, bias=False)
    start = torch.ones(4, 4)
    with torch.no_grad():
        layer.weight.copy_(start)
    opt = build_optimizer(node, layer)
    layer.weight.grad = torch.zeros_like(layer.weight)
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), start * (1 - 1e-3))


def test_a_task_without_a_row_is_one_clear_line(pretrained, tmp_path, monkeypatch, capsys):
    args = [
        f"model.path={pretrained}",
        "recipe=glue_base",
        "task=wnli",
        f"hydra.run.dir={tmp_path}",
    ]
    assert finetune_error_line(args, monkeypatch, capsys).startswith(
        "flexbert-finetune: error: the recipe has settings for the tasks ['cola', "
    )


def test_the_rte_preset_trains_offline_with_its_row(pretrained, tmp_path):
    """GLUE RTE as the paper runs it, offline: the preset reads a `save_to_disk` copy of the
    dataset (its splits and columns) and trains with glue_base's RTE row."""
    import random

    import datasets

    from flexbert.train.finetune import train

    rng = random.Random(3)

    def split(n):
        pairs = [random_sentences(rng, 2) for _ in range(n)]
        return datasets.Dataset.from_dict(
            {
                "sentence1": [" ".join(a) for a, _ in pairs],
                "sentence2": [" ".join(b) for _, b in pairs],
                "label": [int(KEY in a) for a, _ in pairs],
                "idx": list(range(n)),
            }
        )

    datasets.DatasetDict({"train": split(96), "validation": split(32)}).save_to_disk(
        tmp_path / "rte"
    )
    fast = [o for o in FAST if not o.startswith("optimizer.lr")]
    cfg = compose_finetune(
        [
            f"model.path={pretrained}",
            "recipe=glue_base",
            "task=rte",
            "task.dataset.name=null",
            f"task.dataset.path={tmp_path / 'rte'}",
            *fast,
            "trainer.max_duration=1ep",  # the row's 3 epochs, cut for the test
        ]
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["config"]["optimizer"]["lr"] == pytest.approx(5e-5)
    assert summary["config"]["optimizer"]["weight_decay"] == pytest.approx(1e-5)
    assert summary["data"]["examples"] == {"train": 96, "eval": 32}
    assert summary["train"]["epochs"] == 1 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
