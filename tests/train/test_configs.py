"""Every Hydra config composes and its model node validates into a ModelConfig."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from flexbert import ConfigError, ModelConfig
from flexbert.train import paths
from flexbert.train.model_config import resolve_model_config
from flexbert.train.paths import conf_dir, overlay_dir, register_overlays
from tests.train.conftest import MODERNBERT_IDS, compose_config

EXPERIMENTS = sorted(p.stem for p in overlay_dir("experiment").glob("*.yaml"))
ABLATIONS = sorted(p.stem for p in overlay_dir("ablation").glob("*.yaml"))


def test_overlay_folders_are_registered_as_groups():
    names = register_overlays()
    assert names["experiment"] == EXPERIMENTS
    assert {"modernbert_base_pretrain", "modernbert_large_pretrain", "context_extension"} <= set(
        EXPERIMENTS
    )
    assert names["ablation"] == ABLATIONS and ABLATIONS
    assert (conf_dir() / "pretrain.yaml").exists()


def test_quickstart_default_is_a_tiny_model_on_the_stdlib_corpus():
    cfg = compose_config()
    model = resolve_model_config(cfg.model, MODERNBERT_IDS)
    assert (model.hidden_size, model.num_layers) == (64, 4)
    assert cfg.data.corpus.source == "stdlib" and cfg.trainer.device == "cpu"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = compose_config([f"experiment={name}"])
    model = resolve_model_config(cfg.model, MODERNBERT_IDS)
    assert isinstance(model, ModelConfig)
    instantiate(cfg.scheduler)


def test_paper_recipes_carry_the_paper_settings():
    base = compose_config(["experiment=modernbert_base_pretrain"])
    m = resolve_model_config(base.model, MODERNBERT_IDS)
    assert (m.hidden_size, m.num_layers, m.intermediate_size) == (768, 22, 1152)
    assert base.optimizer._target_ == "optimi.StableAdamW" and base.optimizer.lr == 8e-4
    assert base.data.mlm_probability == 0.3 and base.data.seq_len == 1024
    base_model = resolve_model_config(base.model, MODERNBERT_IDS)
    assert (base_model.attention_dropout, base_model.attention_out_dropout) == (0.0, 0.1)
    large = resolve_model_config(
        compose_config(["experiment=modernbert_large_pretrain"]).model, MODERNBERT_IDS
    )
    assert (large.hidden_size, large.num_layers) == (1024, 28)
    ext = compose_config(["experiment=context_extension"])
    e = resolve_model_config(ext.model, MODERNBERT_IDS)
    assert e.position.global_theta == 160_000 and e.position.local_theta == 10_000
    assert ext.data.seq_len == 8192 and ext.optimizer.lr < base.optimizer.lr
    from flexbert.train.pretrain import check_start_weights

    with pytest.raises(ConfigError, match="no weights were given"):  # not a random start
        check_start_weights(ext)
    check_start_weights(compose_config(["experiment=context_extension", "init_from.path=HF"]))
    check_start_weights(compose_config(["experiment=context_extension", "continue_from.path=a"]))
    check_start_weights(compose_config(["experiment=context_extension", "trainer.load_path=a.pt"]))
    check_start_weights(base)  # phase 1 starts from random weights
    assert base.model.sparse_prediction and base.trainer.max_duration == "1719000000000tok"
    decay = compose_config(["experiment=context_extension_decay"])
    assert (
        decay.scheduler.alpha_f == 0.001 and decay.scheduler.t_decay == decay.trainer.max_duration
    )
    large_ext = compose_config(["experiment=context_extension_large_decay"])
    assert resolve_model_config(large_ext.model, MODERNBERT_IDS).hidden_size == 1024
    assert (large_ext.optimizer.lr, large_ext.optimizer.weight_decay) == (5e-5, 1e-6)
    assert (large_ext.data.batch_size, large_ext.data.seq_len) == (624, 8192)


@pytest.mark.parametrize("name", ABLATIONS)
def test_every_ablation_and_each_of_its_sweep_points_composes(name):
    cfg = compose_config([f"ablation={name}"], return_hydra=True)
    params = cfg.hydra.sweeper.params
    assert params
    for key, values in params.items():
        for value in str(values).split(","):
            point = compose_config([f"ablation={name}", f"{key}={value}"])
            resolve_model_config(point.model, MODERNBERT_IDS)


@pytest.mark.parametrize(
    "override",
    [
        "optimizer=adamw",
        "scheduler=cosine",
        "scheduler=linear",
        "trainer=gpu",
        "logger=wandb",
        "callbacks=none",
        "model/norm=rmsnorm",
        "model/attention_pattern=global",  # tiny names local_global: no keys leak across
        "model/position=absolute",
        "model/size=base",
        "model.padding=padded",
    ],
)
def test_group_options_compose(override):
    cfg = compose_config([override])
    resolve_model_config(cfg.model, MODERNBERT_IDS)
    instantiate(cfg.scheduler)


def test_data_mds_needs_its_paths():
    from flexbert.train.data import get_shards, get_tokenizer

    cfg = compose_config(["data=mds"])
    assert cfg.data.corpus is None
    assert cfg.data.tokenizer._get_node("path")._is_missing()
    with pytest.raises(ConfigError, match=r"data.mds.dir \(or data.mds.streams\) is required"):
        get_shards(cfg.data, tokenizer=None, cache_dir=None)
    with pytest.raises(ConfigError, match="data.tokenizer.path is required"):
        get_tokenizer(cfg.data.copy(), cache_dir=None)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("+model.hidden_sise=64", "hidden_sise"),
        ("+model.norm.epsilon=0.1", "epsilon"),
        ("model/norm=rmsnorm", None),
    ],
)
def test_a_bad_model_key_is_named(override, needle):
    cfg = compose_config([override])
    if needle is None:
        resolve_model_config(cfg.model, MODERNBERT_IDS)
        return
    with pytest.raises(ConfigError, match=needle):
        resolve_model_config(cfg.model, MODERNBERT_IDS)


def test_from_tokenizer_fields_need_a_tokenizer():
    with pytest.raises(ValueError, match="vocab_size"):
        resolve_model_config(compose_config().model)
    tokenizer_ids = dict(vocab_size=512, pad_token_id=0, cls_token_id=1, sep_token_id=2)
    fixed = compose_config(["model.vocab_size=1024", "model.mask_token_id=7"])
    model = resolve_model_config(fixed.model, tokenizer_ids)
    assert (model.vocab_size, model.pad_token_id, model.mask_token_id) == (1024, 0, 7)


def test_wandb_logger_config_is_offline_and_works_with_current_wandb():
    cfg = compose_config(["logger=wandb"])
    assert cfg.logger.wandb.init_kwargs.mode == "offline"
    logger = instantiate(cfg.logger.wandb)
    from wandb.sdk.wandb_run import Run

    assert hasattr(Run, "get_url") and type(logger).__name__ == "WandBLogger"


@pytest.mark.parametrize("trainer", ["cpu", "gpu"])
def test_trainer_node_gives_composer_its_keywords_and_flexbert_its_own(trainer):
    import inspect

    from composer import Trainer

    from flexbert.train.app import trainer_kwargs

    cfg = compose_config([f"trainer={trainer}"])
    kwargs = trainer_kwargs(cfg)
    assert "compile_layers" not in kwargs and "compile_config" not in kwargs
    assert "activation_checkpointing" not in kwargs
    assert set(kwargs) <= set(inspect.signature(Trainer).parameters)
    assert cfg.trainer.compile_layers is (trainer == "gpu")
    fsdp = "+trainer.parallelism_config.fsdp.sharding_strategy=FULL_SHARD"  # as the README says
    kwargs = trainer_kwargs(compose_config([f"trainer={trainer}", fsdp]))
    assert kwargs["parallelism_config"] == {"fsdp": {"sharding_strategy": "FULL_SHARD"}}


def test_compile_layers_compiles_each_encoder_layer(tiny_run_config, tmp_path):
    from flexbert.train.pretrain import build_trainer
    from flexbert.train.runtime import trained_model

    trainer, _ = build_trainer(tiny_run_config("trainer.compile_layers=true"), tmp_path / "run")
    layers = trained_model(trainer).model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    trainer.close()


def test_activation_checkpointing_from_the_trainer_node(tiny_run_config, tmp_path):
    from flexbert.train.pretrain import build_trainer
    from flexbert.train.runtime import trained_model

    cfg = tiny_run_config("trainer.activation_checkpointing=true")
    trainer, _ = build_trainer(cfg, tmp_path / "run")
    assert all(layer.checkpointing for layer in trained_model(trainer).model.layers)
    trainer.close()


def test_algorithms_group_clips_gradients_and_combines(tiny_run_config, tmp_path):
    """algorithms=gradient_clipping reaches Composer and clips: the gradients a callback sees
    after the step's backward have at most the threshold's norm; several combine."""
    from composer.algorithms import GradientClipping
    from composer.core import Callback

    from flexbert.train.pretrain import build_trainer

    norms = []

    class GradNorm(Callback):
        def after_train_batch(self, state, logger):  # algorithms run before callbacks
            grads = [p.grad for p in state.model.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    for threshold in ("1e-3", "1e3"):
        cfg = tiny_run_config(
            "algorithms=gradient_clipping",
            f"algorithms.gradient_clipping.clipping_threshold={threshold}",
            "trainer.max_duration=2ba",
        )
        trainer, _ = build_trainer(cfg, tmp_path / f"run{threshold}")
        assert [type(a) for a in trainer.state.algorithms] == [GradientClipping]
        trainer.state.callbacks.append(GradNorm())
        trainer.fit()
        trainer.close()
    clipped, free = norms[:2], norms[2:]
    assert all(n <= 1e-3 * 1.001 for n in clipped)
    assert all(n > 1e-2 for n in free)  # unclipped gradients are far larger
    both = compose_config(["algorithms=[gradient_clipping,ema]"])
    assert set(both.algorithms) == {"gradient_clipping", "ema"}
    assert compose_config([]).algorithms == {}
    assert "ema" in compose_config(["algorithms=ema"]).algorithms


def test_activation_checkpointing_twice_is_refused():
    from flexbert import FlexBertForMaskedLM, ModelConfig
    from flexbert.registry import ConfigError
    from flexbert.train.app import prepare_layers

    both = [
        "trainer.activation_checkpointing=true",
        "+trainer.parallelism_config.fsdp.activation_checkpointing=true",
    ]
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny"))
    with pytest.raises(ConfigError, match="recomputed twice"):
        prepare_layers(compose_config(both), model)
    assert not any(layer.checkpointing for layer in model.model.layers)
    prepare_layers(compose_config(both[:1]), model)
    assert all(layer.checkpointing for layer in model.model.layers)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("trainer.max_duration=abc", r"trainer.max_duration='abc' is not a duration.*800ba"),
        ("trainer.eval_interval=5 batches", "trainer.eval_interval='5 batches' is not a dur"),
        ("+trainer.max_duraton=5ba", r"trainer.max_duraton is not .*did you mean \['max_dura"),
        ("trainer.max_duration=1ep", r"trainer.max_duration='1ep' counts epochs.*tok"),
        ("trainer.max_duration=800", r"trainer.max_duration=800 counts epochs.*800ba"),
        ("scheduler.t_warmup=2ep", r"scheduler.t_warmup='2ep' counts epochs.*0.1dur"),
        ("trainer.eval_interval=0.5dur", r"eval_interval='0.5dur' is a fraction.*2000ba"),
        ("trainer.save_interval=0.5dur", r"save_interval='0.5dur' is a fraction.*2000ba"),
        ("+trainer.save_folder=/tmp/ckpt", r"trainer.save_folder is set by FlexBERT.*run dir"),
        ("+trainer.seed=3", r"trainer.seed is set by FlexBERT from the top-level seed"),
        ("+trainer.device_train_microbatch_size=2", r"set by FlexBERT from data.micro_batch"),
    ],
)
def test_a_bad_trainer_key_or_duration_is_one_line_before_any_data(
    override, needle, tmp_path, monkeypatch, capsys
):
    """Checked in run_app before the task starts: no shards are prepared, no traceback."""
    import re
    import sys

    from flexbert.train.pretrain import main

    cache = tmp_path / "cache"
    argv = ["flexbert-train", override, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(needle, err.strip().splitlines()[-1]), err
    assert not cache.exists()


@pytest.mark.parametrize("app", ["pretrain", "finetune"])
def test_train_from_python_checks_the_config_as_the_command_does(app, tmp_path):
    """`train(cfg, run_dir)` after `compose_config`: a misspelt trainer key or a number that
    is none is refused by name before the run folder or any data exists."""
    import importlib

    train = importlib.import_module(f"flexbert.train.{app}").train
    cache = f"paths.cache_dir={tmp_path / 'cache'}" if app == "pretrain" else "seed=1"
    for override, needle in (
        ("+trainer.max_duraton=5ba", r"trainer.max_duraton is not .*did you mean"),
        ("optimizer.lr=fast", "optimizer.lr must be a number, got 'fast'"),
    ):
        cfg = paths.compose_config(app, [override, cache])
        with pytest.raises(ConfigError, match=needle):
            train(cfg, tmp_path / "run")
    assert sorted(tmp_path.iterdir()) == []


def test_flex_training_on_the_cpu_is_refused_when_the_model_is_prepared():
    from flexbert import FlexBertForMaskedLM, ModelConfig
    from flexbert.train.app import prepare_layers

    model = FlexBertForMaskedLM(ModelConfig.preset("tiny", backend="flex"))
    with pytest.raises(ConfigError, match="flex cannot train on the CPU.*model/backend=sdpa"):
        prepare_layers(compose_config(["trainer.device=cpu"]), model)
    from tests.train.finetune_helpers import compose_finetune

    finetune = compose_finetune(["trainer.device=cpu"])  # no model/backend group there
    with pytest.raises(ConfigError, match=r"set \+model.overrides.backend=sdpa"):
        prepare_layers(finetune, model)
    prepare_layers(compose_config(["trainer.device=cpu", "eval_only=true"]), model)  # inference
    sdpa = FlexBertForMaskedLM(ModelConfig.preset("tiny", backend="sdpa"))
    prepare_layers(compose_config(["trainer.device=cpu"]), sdpa)


def test_sweep_table_orders_jobs_by_number_and_shows_only_what_varies(tmp_path):
    from flexbert.train.sweep import collect, table

    for name, task, acc in (("10_sst2", "sst2", 0.9), ("2_cola", "cola", 0.5)):
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- task={task}\n- model.path=/m\n")
        best = {"metric": "accuracy", "value": acc + 0.1, "epoch": 2, "batch": 9}
        summary = {"eval": {"accuracy": acc}, "train": {"loss_last": 0.1}, "parameters": 7}
        summary["eval_best"] = best
        (job / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "3_unfinished" / ".hydra").mkdir(parents=True)  # no summary: left out
    rows = collect(tmp_path)
    assert [r["job"] for r in rows] == ["2_cola", "10_sst2"]
    lines = table(rows).splitlines()
    head = "| job | task | eval.accuracy | train.loss_last | best.accuracy | best.epoch |"
    assert lines[0] == head + " parameters |"
    assert lines[2] == "| 2_cola | cola | 0.5 | 0.1 | 0.6 | 2 | 7 |"


def test_a_sweep_over_seeds_reports_mean_std_and_median_per_setting(tmp_path):
    """Jobs that differ only in their seed are grouped; the statistics are over those seeds
    only, and a sweep without a seed axis writes no such table."""
    from flexbert.train.sweep import SEEDS_JSON, write_report

    accuracy = {("1e-5", "1"): 0.5, ("1e-5", "2"): 0.7, ("1e-5", "3"): 0.9, ("3e-5", "1"): 0.8}
    for n, ((lr, seed), acc) in enumerate(accuracy.items()):
        job = tmp_path / f"{n}_sst2"
        (job / ".hydra").mkdir(parents=True)
        overrides = f"- task=sst2\n- optimizer.lr={lr}\n- seed={seed}\n"
        (job / ".hydra" / "overrides.yaml").write_text(overrides)
        summary = {"eval": {"accuracy": acc}, "train": {"loss_last": 0.1}, "parameters": 7}
        (job / "summary.json").write_text(json.dumps(summary))
    text = write_report(tmp_path)
    groups = json.loads((tmp_path / SEEDS_JSON).read_text())
    assert [(g["overrides"], g["seeds"]) for g in groups] == [
        ({"optimizer.lr": "1e-5"}, ["1", "2", "3"]),
        ({"optimizer.lr": "3e-5"}, ["1"]),
    ]
    stats = groups[0]["metrics"]["eval.accuracy"]
    assert stats["n"] == 3 and stats["median"] == 0.7 and stats["min"] == 0.5
    assert stats["mean"] == pytest.approx(0.7) and stats["std"] == pytest.approx(0.2)
    assert groups[1]["metrics"]["eval.accuracy"]["std"] == 0.0
    assert "| optimizer.lr | seeds | eval.accuracy |" in text
    assert "| 1e-5 | 3 | 0.7 ± 0.2 (0.7) |" in text
    # without a seed axis: the plain table only
    other = tmp_path / "no_seeds"
    for n, lr in enumerate(("1e-5", "3e-5")):
        (other / str(n) / ".hydra").mkdir(parents=True)
        (other / str(n) / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={lr}\n")
        (other / str(n) / "summary.json").write_text(json.dumps({"eval": {"accuracy": 0.5}}))
    (other / SEEDS_JSON).write_text("[]")  # from an earlier report: removed, not left stale
    assert "over seeds" not in write_report(other) and not (other / SEEDS_JSON).exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only case")
def test_gpu_trainer_without_a_gpu_is_a_one_line_config_error(tiny_run_config, tmp_path):
    from flexbert.train.pretrain import train

    with pytest.raises(ConfigError, match="no CUDA GPU here; add trainer=cpu"):
        train(tiny_run_config("trainer=gpu"), tmp_path / "run")


def test_last_checkpoint_orders_epochs_and_batches_as_numbers(tmp_path):
    from flexbert.train.checkpoints import last_checkpoint

    assert last_checkpoint(tmp_path) is None
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("ep0-ba9-rank0.pt", "ep0-ba10-rank0.pt", "ep0-ba3-rank0.pt", "latest-rank0.pt"):
        (folder / name).write_bytes(b"")
    assert last_checkpoint(tmp_path).name == "ep0-ba10-rank0.pt"  # not ba9, as text sorts
    (folder / "ep1-ba2-rank0.pt").write_bytes(b"")
    assert last_checkpoint(tmp_path).name == "ep1-ba2-rank0.pt"


@pytest.mark.parametrize(
    ("config", "app"), [("pretrain", "flexbert-train"), ("finetune", "flexbert-finetune")]
)
def test_help_names_the_command_and_its_examples_compose(config, app):
    """`--help` starts with what the command does; each example line in it composes."""
    from hydra import compose, initialize_config_dir

    register_overlays()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(
            config,
            overrides=["task=sst2"] if config == "finetune" else [],
            return_hydra_config=True,
        )
        header = cfg.hydra.help.header
        assert header.startswith(f"{app}: ") and cfg.hydra.help.app_name == app
        examples = [
            line.split("#")[0].split()[1:]
            for line in header.splitlines()
            if line.strip().startswith(f"{app} ")
        ]
        assert examples
        for args in examples:
            overrides = [a.split(",")[0] for a in args if a != "-m"]  # one point of a sweep
            compose(config, overrides=overrides)


@pytest.mark.parametrize("group", ["experiment", "ablation"])
def test_a_misspelt_experiment_or_ablation_is_refused_not_skipped(group):
    """A typo must not silently fall back to the quickstart: Hydra names the valid options."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    register_overlays()
    missing = pytest.raises(MissingConfigException, match=f"Could not find '{group}/nope'")
    with initialize_config_dir(str(conf_dir()), version_base="1.3"), missing:
        compose("pretrain", overrides=[f"{group}=nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="varlen builds where a GPU is visible")
def test_a_saved_gpu_backend_is_read_as_auto_on_a_cpu_machine(tmp_path, caplog):
    """A GPU run's model_config.json names backend varlen; export or fine-tuning on a CPU
    machine reads it with `auto` (same attention, another kernel) and says so."""
    from flexbert import FlexBertForMaskedLM
    from flexbert.train.checkpoints import read_model_config

    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(ModelConfig.preset("tiny", backend="varlen").to_dict()))
    with pytest.raises(ConfigError, match="runs on CUDA only"):
        FlexBertForMaskedLM(ModelConfig.from_dict(json.loads(path.read_text())))
    with caplog.at_level("WARNING", logger="flexbert"):
        cfg = read_model_config(path)
    assert cfg.backend.name == "auto" and "using backend 'auto'" in caplog.text
    FlexBertForMaskedLM(cfg)  # builds here


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.batch_size=abc", "data.batch_size must be an integer, got 'abc'"),
        ("optimizer.lr=fast", "optimizer.lr must be a number, got 'fast'"),
        ("seed=abc", "seed must be an integer"),
        ("data.mlm_probability=true", "data.mlm_probability must be a number"),
    ],
)
def test_numbers_given_as_words_are_refused_by_name(override, needle):
    from flexbert.train.app import check_number_keys

    with pytest.raises(ConfigError, match=needle):
        check_number_keys(compose_config([override]))
    check_number_keys(compose_config())  # the defaults pass


def test_summary_paths_hold_from_another_directory(tmp_path, monkeypatch):
    """summary.json records local paths absolute (the quickstart's cache is relative to the
    launch directory); a Hub id or URL stays as given."""
    from flexbert.train.app import absolute_if_local

    (tmp_path / "runs" / "tok").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert absolute_if_local("runs/tok") == str(tmp_path / "runs" / "tok")
    assert absolute_if_local("answerdotai/ModernBERT-base") == "answerdotai/ModernBERT-base"


def test_compose_config_composes_as_the_commands_do():
    """The Python entry to the configs: experiments and recipes compose as on the command line."""
    from flexbert.train.paths import compose_config

    cfg = compose_config("pretrain", ["experiment=modernbert_base_pretrain"])
    assert cfg.trainer.max_duration == "1719000000000tok"
    finetune = compose_config("finetune", ["recipe=glue_base", "task=rte"])
    assert finetune.optimizer.lr == pytest.approx(5e-5)
    with pytest.raises(ValueError, match=r"one of \('pretrain', 'finetune'\), got 'train'"):
        compose_config("train")
