"""End to end: a few-batch pretraining run, its checkpoint, resumption, HF export and golden losses."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import pytest
import torch

from flexbert import ConfigError
from flexbert.train.checkpoints import load_checkpoint_model, read_model_config
from flexbert.train.export import main as export_main
from flexbert.train.pretrain import report, train
from tests.train.conftest import SHORT_RUN

GOLDEN = Path(__file__).with_name("golden_loss.json")


def test_run_writes_summary_checkpoints_and_hf_export(first_run):
    root, _, summary = first_run
    run = root / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["train"]["batches"] == 6 and on_disk["train"]["tokens"] > 0
    assert on_disk["train"]["tokens_per_second"] > 0
    assert len(on_disk["train"]["loss_curve"]) == 6
    assert {"MaskedAccuracy", "LanguageCrossEntropy", "Perplexity"} <= set(on_disk["eval"])
    assert on_disk["config"]["model"]["vocab_size"] == "from_tokenizer"
    assert on_disk["model_config"]["vocab_size"] == 512  # set from the trained tokenizer
    assert (run / "checkpoints" / "ep0-ba3-rank0.pt").exists()
    assert on_disk["paths"]["last_checkpoint"].endswith("ep0-ba6-rank0.pt")
    assert (run / "hf" / "config.json").exists() and (run / "hf" / "tokenizer.json").exists()
    assert str(run) in report(summary)
    # batch-size warmup: 4 rows (one microbatch) at first, then the full 8 rows (two)
    counts = [s["tokens"] for s in on_disk["train"]["loss_curve"]]
    per_step = [b - a for a, b in zip([0, *counts], counts)]
    assert per_step[0] < per_step[-1]


def test_hf_export_loads_with_transformers_and_gives_the_same_logits(first_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    root, _, summary = first_run
    run = root / "run"
    ours = load_checkpoint_model(
        summary["paths"]["last_checkpoint"], read_model_config(run / "model_config.json")
    )
    hf = AutoModelForMaskedLM.from_pretrained(run / "hf").eval()
    tok = AutoTokenizer.from_pretrained(run / "hf")
    enc = tok(
        ["def add(a, b):\n    return a + b", "The quick brown fox."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = ours(enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        got = hf(**enc).logits
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-4, atol=1e-4)
    # truncation=True cuts to the model's length (512 here), not the tokenizer's 8192
    assert tok.model_max_length == hf.config.max_position_embeddings == 512
    long = tok(" ".join(["return a + b"] * 300), truncation=True)["input_ids"]
    assert len(long) == 512


def test_resuming_from_a_checkpoint_continues_at_the_right_batch(first_run, tiny_run_config):
    """The checkpoint holds the step batcher's and the packer's state, so a resumed run
    continues from it: without Composer replaying the epoch's batches (spin_dataloaders)."""
    root, _, first = first_run
    ckpt = root / "run" / "checkpoints" / "ep0-ba3-rank0.pt"
    saved = torch.load(ckpt, weights_only=False)["state"]["dataset_state"]["train"]
    assert saved["steps"] == 3 and saved["loader"] is not None
    cfg = tiny_run_config(
        f"trainer.load_path={ckpt}",
        f"paths.cache_dir={root / 'cache'}",
        "+trainer.spin_dataloaders=false",
    )
    again = train(cfg, root / "resumed")
    assert again["train"]["batches"] == 6 and again["train"]["batches_this_run"] == 3
    resumed = [(s["batch"], s["tokens"], s["loss"]) for s in again["train"]["loss_curve"]]
    original = [(s["batch"], s["tokens"], s["loss"]) for s in first["train"]["loss_curve"][3:]]
    assert [r[:2] for r in resumed] == [o[:2] for o in original]  # same batches, same tokens
    assert [r[2] for r in resumed] == pytest.approx([o[2] for o in original], rel=1e-5)


def test_flexbert_export_turns_a_checkpoint_into_an_hf_directory(first_run, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM

    root, _, _ = first_run
    ckpt = root / "run" / "checkpoints" / "ep0-ba3-rank0.pt"
    assert export_main([str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert "hf" in capsys.readouterr().out
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == 512 and (tmp_path / "hf" / "tokenizer.json").exists()
    lonely = tmp_path / "lonely.pt"
    shutil.copy(ckpt, lonely)
    assert export_main([str(lonely), "--out", str(tmp_path / "x")]) == 2  # no model config
    capsys.readouterr()
    # a non-empty --out is kept unless --overwrite; a run folder exports its newest checkpoint
    notes = tmp_path / "hf" / "notes.txt"
    notes.write_text("mine")
    assert export_main([str(root / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "is not empty" in capsys.readouterr().err and notes.read_text() == "mine"
    args = [str(root / "run" / "checkpoints"), "--out", str(tmp_path / "hf"), "--overwrite"]
    assert export_main(args) == 0
    newest = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert not torch.equal(
        newest.model.embeddings.tok_embeddings.weight, model.model.embeddings.tok_embeddings.weight
    )  # ba6, not ba3


def _environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__.split("+")[0]}


def test_golden_losses_of_the_short_deterministic_run(first_run):
    """torchtitan-style: the first steps' losses are pinned (FLEXBERT_UPDATE_GOLDEN=1 rewrites).

    The corpus is this interpreter's stdlib, so the file only applies to the Python and torch
    versions it records; elsewhere the test is skipped.
    """
    _, _, summary = first_run
    losses = [round(s["loss"], 6) for s in summary["train"]["loss_curve"]]
    if os.environ.get("FLEXBERT_UPDATE_GOLDEN") or not GOLDEN.exists():
        GOLDEN.write_text(json.dumps({**_environment(), "losses": losses}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if {k: golden[k] for k in _environment()} != _environment():
        pytest.skip(f"golden losses recorded with {golden['python']} / torch {golden['torch']}")
    assert losses == pytest.approx(golden["losses"], rel=1e-4)


def test_padded_layout_trains_through_the_same_entry_point(tiny_run_config, tmp_path):
    cfg = tiny_run_config("model.padding=padded", *SHORT_RUN)
    summary = train(cfg, tmp_path / "padded")
    assert summary["train"]["batches"] == 2 and summary["paths"]["hf"] is None
    assert summary["model_config"]["padding"] == "padded"


def test_eval_split_masks_at_the_eval_rate_with_the_same_masks_every_time(
    tiny_run_config, tmp_path
):
    from flexbert.data.tokenizer import special_token_ids
    from flexbert.train.data import build_loaders, get_shards, get_tokenizer
    from flexbert.train.model_config import resolve_model_config

    cfg = tiny_run_config()
    cache = tmp_path / "cache"
    tokenizer, _ = get_tokenizer(cfg.data, cache)
    model_cfg = resolve_model_config(cfg.model, special_token_ids(tokenizer))
    mds_dir, _ = get_shards(cfg.data, tokenizer, cache)
    train, val = build_loaders(cfg.data, model_cfg, tokenizer, mds_dir, cfg.seed, 1)
    assert val.masker.mlm_probability == cfg.data.eval_mlm_probability == 0.15
    assert train.loader.masker.mlm_probability == cfg.data.mlm_probability == 0.3
    first, second = list(val), list(val)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, second))


@pytest.mark.parametrize("source", ["checkpoint", "hf", "run"])
def test_init_from_grows_a_trained_run_into_a_larger_model(first_run, tiny_run_config, source):
    """A wider, deeper model starts from the first run's weights (middle tiling, gopher map);
    with lr 0 the weights after two steps are still exactly the grown ones. The source may be
    a checkpoint, an HF export or the run folder (its newest checkpoint)."""
    from flexbert.train.checkpoints import load_pretrained_mlm

    root, _, first = first_run
    paths = first["paths"]
    path = {"checkpoint": paths["last_checkpoint"], "hf": paths["hf"], "run": paths["run_dir"]}
    path = path[source]
    cfg = tiny_run_config(
        f"init_from.path={path}",
        f"paths.cache_dir={root / 'cache'}",
        "model.hidden_size=96",
        "model.num_heads=6",
        "model.intermediate_size=144",
        "model.num_layers=6",
        "optimizer=adamw",
        "optimizer.lr=0.0",
        "trainer.max_duration=2ba",
        "trainer.eval_interval=2ba",
        "export_hf=false",
    )
    summary = train(cfg, root / f"grown_{source}")
    grown = summary["init_from"]
    assert grown["source_shape"] == [4, 64, 96] and grown["target_shape"] == [6, 96, 144]
    assert grown["source_layer_of_each_layer"] == [0, 1, 1, 2, 3, 3]
    assert grown["tile_mode"] == "middle"  # ModernBERT's, the default
    assert grown["dropped"] == []
    small = load_pretrained_mlm(path)
    big = load_checkpoint_model(
        summary["paths"]["last_checkpoint"],
        read_model_config(root / f"grown_{source}" / "model_config.json"),
    )
    torch.testing.assert_close(
        big.model.layers[5].mlp.Wo.weight[16:80, 24:120], small.model.layers[3].mlp.Wo.weight
    )
    torch.testing.assert_close(
        big.model.embeddings.tok_embeddings.weight[:, 16:80],
        small.model.embeddings.tok_embeddings.weight,
    )


def test_init_from_a_missing_path_says_what_it_expects(tiny_run_config, tmp_path):
    cfg = tiny_run_config(f"init_from.path={tmp_path / 'nowhere'}", "trainer.max_duration=1ba")
    with pytest.raises(FileNotFoundError, match="no such directory.*Hub id"):
        train(cfg, tmp_path / "run")


@pytest.mark.slow
def test_two_ranks_train_and_resume_exactly_under_composers_launcher(first_run, tmp_path):
    """`composer -n 2 flexbert-train` (DDP over gloo on the CPU): data prepared once, one
    summary and export from rank 0, and a run resumed from its batch-2 checkpoint repeats the
    uninterrupted run's losses."""
    import socket
    import subprocess
    import sys

    from tests.train.conftest import TINY_RUN

    root, _, _ = first_run
    bin_dir = Path(sys.executable).parent
    common = [o for o in TINY_RUN if not o.startswith(("trainer.max_duration", "trainer.eval_i"))]
    common += [
        f"paths.cache_dir={root / 'cache'}",  # the first run's tokenizer and shards
        "trainer.max_duration=4ba",
        "trainer.eval_interval=4ba",
        "trainer.save_interval=2ba",
        "callbacks.batch_size_warmup=null",
    ]

    def launch(run: Path, *extra: str) -> dict:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [str(bin_dir / "composer"), "-n", "2", "--master_port", str(port)]
        cmd += [str(bin_dir / "flexbert-train"), *common, f"hydra.run.dir={run}", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        assert done.stdout.count("flexbert-train: done") == 1  # only rank 0 reports
        return json.loads((run / "summary.json").read_text())

    full = launch(tmp_path / "full")
    assert full["train"]["batches"] == 4 and (tmp_path / "full" / "hf" / "config.json").exists()
    assert full["train"]["tokens"] == 4 * 8 * 64  # global rows x row length, both ranks
    ckpt = tmp_path / "full" / "checkpoints" / "ep0-ba2-rank0.pt"
    resumed = launch(tmp_path / "resumed", f"trainer.load_path={ckpt}")
    tail = [s["loss"] for s in full["train"]["loss_curve"][2:]]
    assert [s["batch"] for s in resumed["train"]["loss_curve"]] == [3, 4]
    assert [s["loss"] for s in resumed["train"]["loss_curve"]] == pytest.approx(tail, rel=1e-5)


@pytest.mark.slow
def test_a_sweep_ends_with_one_table_of_its_jobs(first_run, tmp_path):
    """`flexbert-train -m` over two activations: both jobs train, and the SweepReport callback
    writes sweep_results.md with the swept key as a column and each job's metrics."""
    import subprocess
    import sys

    from flexbert.train.sweep import main as sweep_main
    from tests.train.conftest import TINY_RUN

    root, _, _ = first_run
    overrides = [
        o for o in TINY_RUN if not o.startswith(("trainer.max_duration", "trainer.eval_i"))
    ]
    overrides += [
        f"paths.cache_dir={root / 'cache'}",
        *SHORT_RUN,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "model/activation=gelu,silu",
    ]
    cmd = [str(Path(sys.executable).parent / "flexbert-train"), "-m", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (tmp_path / "sweep" / "sweep_results.md").read_text()
    lines = text.strip().splitlines()
    assert lines[0].startswith("| job | model/activation | eval.LanguageCrossEntropy")
    assert [line.split(" | ")[1] for line in lines[2:]] == ["gelu", "silu"]
    assert "sweep results" in done.stdout
    assert (tmp_path / "sweep" / "0" / "pretrain.log").stat().st_size > 0  # hydra.job.name
    rows = json.loads((tmp_path / "sweep" / "sweep_results.json").read_text())
    assert all(r["metrics"]["eval.LanguageCrossEntropy"] > 0 for r in rows)
    assert sweep_main([str(tmp_path / "sweep")]) == 0  # the same table, rebuilt later
    assert sweep_main([str(tmp_path / "nowhere")]) == 2


def test_wandb_offline_run_records_the_whole_config_in_the_run_dir(
    first_run, tiny_run_config, tmp_path
):
    root, _, _ = first_run
    cfg = tiny_run_config(
        "logger=wandb",
        f"paths.cache_dir={root / 'cache'}",
        *SHORT_RUN,
    )
    train(cfg, tmp_path / "run")
    logs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, "the offline W&B run belongs in the run directory"
    record = logs[0].read_bytes()  # protobuf records; config values are stored as JSON text
    assert b'"hidden_size"' in record and b'"mlm_probability"' in record


def test_hub_ids_for_init_from_and_the_tokenizer(first_run, tiny_run_config, monkeypatch, tmp_path):
    """Continue pretraining a Hub model: weights and tokenizer both from a Hub id (here an
    offline Hugging Face cache holding the first run's export)."""
    from tests.conftest import cache_hub_repo, offline_hub

    root, _, first = first_run
    cache_hub_repo(offline_hub(monkeypatch, tmp_path), "flexbert-tests/mlm", first["paths"]["hf"])
    cfg = tiny_run_config(
        "init_from.path=flexbert-tests/mlm",
        "data.tokenizer.path=flexbert-tests/mlm",
        f"paths.cache_dir={root / 'cache'}",
        *SHORT_RUN,
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["init_from"]["copied"] > 0 and summary["train"]["batches"] == 2
    assert "models--flexbert-tests--mlm" in summary["data"]["tokenizer"]


def test_init_from_with_another_tokenizer_names_the_fix(first_run, tiny_run_config, tmp_path):

    root, _, first = first_run
    cfg = tiny_run_config(
        f"init_from.path={first['paths']['hf']}",
        "data.tokenizer.vocab_size=576",  # a fresh tokenizer of another size
        f"paths.cache_dir={root / 'cache'}",
    )
    with pytest.raises(ConfigError, match="vocab_size differs.*data.tokenizer.path"):
        train(cfg, tmp_path / "run")


def test_with_ema_the_export_is_the_averaged_model(tiny_run_config, tmp_path):
    """Composer's EMA evaluates and checkpoints the averaged weights; hf/ must be them too
    (not the raw training weights that are back in place after the last evaluation)."""
    from flexbert import FlexBertForMaskedLM

    cfg = tiny_run_config(
        "algorithms=ema",
        "algorithms.ema.half_life=2ba",
        "trainer.max_duration=4ba",
        "trainer.eval_interval=2ba",
        "trainer.save_interval=4ba",
    )
    summary = train(cfg, tmp_path / "run")
    state = torch.load(summary["paths"]["last_checkpoint"], weights_only=False)["state"]
    saved = state["model"]
    exported = FlexBertForMaskedLM.from_hf(summary["paths"]["hf"]).state_dict()
    for key in ("model.layers.0.attn.Wqkv.weight", "model.layers.1.mlp.Wo.weight"):
        torch.testing.assert_close(exported[key], saved["model." + key], rtol=0, atol=0)


@pytest.mark.parametrize("source", ["checkpoint", "hf"])
def test_eval_only_scores_a_trained_model_as_its_run_did(
    first_run, tiny_run_config, tmp_path, source
):
    """eval_only=true evaluates the starting weights without a step: the first run's final
    model (its last checkpoint, or its hf/ export) gets the first run's eval numbers."""
    root, _, first = first_run
    start = (
        [f"trainer.load_path={first['paths']['last_checkpoint']}"]
        if source == "checkpoint"
        else [f"init_from.path={first['paths']['hf']}"]
    )
    cfg = tiny_run_config(
        f"paths.cache_dir={root / 'cache'}",
        "eval_only=true",
        "callbacks.batch_size_warmup=null",
        *start,
    )
    summary = train(cfg, tmp_path / "eval")
    assert summary["train"]["batches_this_run"] == 0 and summary["train"]["loss_curve"] == []
    for name, value in first["eval"].items():
        assert summary["eval"][name] == pytest.approx(value, rel=1e-5), name
    assert summary["paths"]["hf"] is None and "eval_only" in summary["paths"]["hf_skipped"]
    assert "evaluated (eval_only)" in report(summary)


def test_the_last_checkpoint_is_the_one_the_run_saved_last(tmp_path):
    """A rerun with save_overwrite=true that stopped at ba400 leaves an earlier run's ba800
    beside it; Composer's latest-rank0.pt link says which one this run saved last."""
    from flexbert.train.checkpoints import last_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert last_checkpoint(tmp_path) is None
    for name in ("ep0-ba9-rank0.pt", "ep0-ba10-rank0.pt", "ep0-ba800-rank0.pt"):
        (folder / name).write_bytes(b"x")
    assert last_checkpoint(tmp_path).name == "ep0-ba800-rank0.pt"  # no link: the newest
    (folder / "latest-rank0.pt").symlink_to("ep0-ba10-rank0.pt")
    assert last_checkpoint(tmp_path) == (folder / "ep0-ba10-rank0.pt").resolve()
    (folder / "ep0-ba10-rank0.pt").unlink()  # a dangling link: the newest again
    assert last_checkpoint(tmp_path).name == "ep0-ba800-rank0.pt"
