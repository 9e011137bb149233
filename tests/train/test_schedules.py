"""The warmup-stable-decay LR schedule, the optimizers and the batch-size warmup schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from composer.core import Time, Timestamp
from hydra.utils import instantiate

from flexbert import FlexBertForMaskedLM, ModelConfig
from flexbert.train.optim import build_optimizer
from flexbert.train.schedulers import WarmupStableDecayScheduler
from tests.train.conftest import compose_config


def _state(max_duration: str, **now: int) -> SimpleNamespace:
    """The parts of a Composer State that schedulers read."""
    return SimpleNamespace(
        max_duration=Time.from_timestring(max_duration),
        timestamp=Timestamp(**now),
        dataloader_len=None,
    )


def test_wsd_warmup_plateau_and_one_minus_sqrt_decay_to_zero():
    wsd = WarmupStableDecayScheduler(t_warmup="100ba", t_decay="0.2dur")
    lr = {b: wsd(_state("1000ba", batch=b)) for b in (0, 50, 100, 500, 800, 900, 1000)}
    assert lr[0] == 0.0 and lr[50] == pytest.approx(0.5)
    assert lr[100] == lr[500] == lr[800] == 1.0  # plateau up to the decay start
    assert lr[900] == pytest.approx(1 - math.sqrt(0.5))
    assert lr[1000] == pytest.approx(0.0)


def test_wsd_in_tokens_with_a_floor_and_linear_shape():
    wsd = WarmupStableDecayScheduler("1000tok", "4000tok", alpha_f=0.1, decay_shape="linear")
    assert wsd(_state("10000tok", token=500)) == pytest.approx(0.5)
    assert wsd(_state("10000tok", token=8000)) == pytest.approx(0.1 + 0.9 * 0.5)
    assert wsd(_state("10000tok", token=10000)) == pytest.approx(0.1)


def test_wsd_refuses_a_decay_in_another_unit():
    with pytest.raises(ValueError, match="t_decay"):
        WarmupStableDecayScheduler("10ba", "100ba")(_state("10000tok", token=1, batch=1))
    with pytest.raises(ValueError, match="decay_shape"):
        WarmupStableDecayScheduler(decay_shape="cosine")
    # no decay at all (a recipe's 0tok over a short run in batches) fits any unit
    no_decay = WarmupStableDecayScheduler("0ba", "0tok")
    assert no_decay(_state("5ba", token=100, batch=4)) == 1.0


def test_the_default_scheduler_config_builds_the_wsd_scheduler():
    sched = instantiate(compose_config().scheduler)
    assert isinstance(sched, WarmupStableDecayScheduler) and sched.decay_shape == "1-sqrt"


@pytest.mark.parametrize("name", ["stable_adamw", "adamw"])
def test_optimizers_build_without_decay_on_bias_and_norm_and_step_on_cpu(name):
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny"))
    opt = build_optimizer(compose_config([f"optimizer={name}"]).optimizer, model)
    decay, plain = opt.param_groups
    assert plain["weight_decay"] == 0.0 and decay["weight_decay"] > 0
    named = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in named[id(p)] or "bias" in named[id(p)] for p in plain["params"])
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(plain["params"]) == n_params  # tied decoder counted once
    before = model.head.dense.weight.detach().clone()
    ids = torch.randint(5, 500, (2, 16))
    model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(before, model.head.dense.weight)
    if name == "stable_adamw":
        assert type(opt).__name__ == "StableAdamW" and decay["decouple_lr"]
