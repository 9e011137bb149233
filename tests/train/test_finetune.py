"""flexbert-finetune end to end on tiny synthetic tasks: a random tiny "pretrained" encoder
learns whether a text contains a word, a regression and a token-tagging task, and its
Hugging Face export gives the same logits in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexbert.train.finetune import report, train
from flexbert.train.paths import conf_dir
from tests.train.finetune_helpers import (
    FAST,
    KEY,
    compose_finetune,
    file_overrides,
    finetune_error_line,
    finetune_run,
)

TASKS = sorted(p.stem for p in (conf_dir() / "task").glob("*.yaml"))


@pytest.fixture(scope="module")
def classification_run(pretrained, contains_word, tmp_path_factory):
    overrides = [f"model.path={pretrained}", *file_overrides(contains_word), *FAST]
    return finetune_run([*overrides, "trainer.max_duration=4ep"], tmp_path_factory.mktemp("ft"))


def test_classification_learns_and_writes_summary(classification_run):
    run, summary = classification_run
    assert summary["eval"]["accuracy"] > 0.85, summary["eval"]
    assert {"accuracy", "f1", "matthews"} <= set(summary["eval"])
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["train"]["epochs"] == 4 and on_disk["data"]["examples"]["eval"] == 128
    assert [e["epoch"] for e in on_disk["eval_history"]] == [1, 2, 3, 4]  # eval each epoch
    best = on_disk["eval_best"]
    assert best["metric"] == "accuracy"
    assert best["value"] == max(e["accuracy"] for e in on_disk["eval_history"])
    assert best["value"] >= summary["eval"]["accuracy"] - 1e-6 and best["epoch"] in (1, 2, 3, 4)
    assert on_disk["paths"]["last_checkpoint"].endswith("-rank0.pt")
    assert str(run / "hf") in report(summary)
    assert f"best         accuracy {best['value']:.4g} at epoch {best['epoch']}" in report(summary)


def test_hf_export_gives_the_same_logits_in_transformers(classification_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flexbert import FlexBertForSequenceClassification

    run, _ = classification_run
    hf = AutoModelForSequenceClassification.from_pretrained(run / "hf").eval()
    ours = FlexBertForSequenceClassification.from_hf(run / "hf").eval()
    tok = AutoTokenizer.from_pretrained(run / "hf")
    enc = tok([f"apple {KEY} stone", "river cloud green quick"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours(enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        got = hf(**enc).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.argmax(-1).tolist() == [1, 0]
    assert tok.model_max_length == hf.config.max_position_embeddings  # truncation fits it


def test_flexbert_export_turns_a_fine_tuning_checkpoint_into_the_task_model(
    classification_run, tmp_path, capsys
):
    from transformers import AutoModelForSequenceClassification

    from flexbert.train.export import main as export_main

    run, summary = classification_run
    task = json.loads((run / "task.json").read_text())
    assert task["type"] == "sequence_classification"
    assert export_main([summary["paths"]["last_checkpoint"], "--out", str(tmp_path / "x")]) == 0
    assert "AutoModelForSequenceClassification.from_pretrained" in capsys.readouterr().out
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "x").eval()
    final = AutoModelForSequenceClassification.from_pretrained(run / "hf").eval()
    assert exported.config.id2label == final.config.id2label
    for a, b in zip(exported.state_dict().values(), final.state_dict().values()):
        torch.testing.assert_close(a, b)  # the last checkpoint is the final model
    assert (tmp_path / "x" / "tokenizer.json").exists()


@pytest.mark.parametrize("source_kind", ["run", "hf"])
@pytest.mark.parametrize("num_labels", [2, 3])
def test_a_fine_tuning_run_seeds_another_task_with_a_fresh_output_layer(
    classification_run, num_labels, source_kind
):
    """The paper's MNLI -> RTE protocol: from a fine-tuning run folder, or its Hugging Face
    export, the encoder (and the pooling head) carry over; the classifier too when the label
    count is the same, a new one otherwise (not a shape error)."""
    from flexbert import FlexBertForSequenceClassification
    from flexbert.train.checkpoints import (
        last_checkpoint,
        load_checkpoint_model,
        load_pretrained,
        read_model_config,
    )

    run, _ = classification_run
    source = load_checkpoint_model(
        last_checkpoint(run),
        read_model_config(run / "model_config.json"),
        FlexBertForSequenceClassification,
    )
    path = run if source_kind == "run" else run / "hf"
    model = load_pretrained(path, FlexBertForSequenceClassification, num_labels=num_labels)
    ours, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items() if not k.startswith("classifier"))
    assert model.classifier.weight.shape[0] == num_labels
    kept = torch.equal(model.classifier.weight, source.classifier.weight)
    assert kept == (num_labels == source.classifier.weight.shape[0])


def test_summary_reports_tokens_and_tokens_per_second(classification_run):
    """As pretraining does: the real (non-padding) tokens trained on, over the fit's seconds."""
    from omegaconf import OmegaConf

    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.tasks import build_examples

    run, summary = classification_run
    task = OmegaConf.create(summary["config"]["task"])
    examples, _ = build_examples(task, load_tokenizer(run / "tokenizer"), 32)
    per_epoch = sum(len(r["input_ids"]) for r in examples["train"])
    t = json.loads((run / "summary.json").read_text())["train"]
    assert t["tokens"] == t["epochs"] * per_epoch
    assert t["tokens_per_second"] == pytest.approx(t["tokens"] / t["seconds"], rel=0.05)
    assert f"{t['tokens']:,} tokens (" in report(summary) and "tokens/s)" in report(summary)


def _moved(run: Path, dest: Path, *names: str) -> Path:
    """The run's last checkpoint copied to `dest` with only the named run files beside it."""
    import shutil

    dest.mkdir()
    for name in names:
        shutil.copy(run / name, dest / name)
    ckpt = Path(json.loads((run / "summary.json").read_text())["paths"]["last_checkpoint"])
    return Path(shutil.copy(ckpt, dest / ckpt.name))


def test_flexbert_export_reads_task_and_tokenizer_from_a_summary(classification_run, tmp_path):
    """--config summary.json with no task.json or tokenizer/ beside the checkpoint: the
    summary's task picks the head and labels, its data.tokenizer the tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flexbert.train.export import main as export_main

    run, _ = classification_run
    ckpt = _moved(run, tmp_path / "moved", "summary.json")
    out = tmp_path / "x"
    assert (
        export_main([str(ckpt), "--config", str(ckpt.parent / "summary.json"), "--out", str(out)])
        == 0
    )
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()
    final = AutoModelForSequenceClassification.from_pretrained(run / "hf").eval()
    assert exported.config.id2label == final.config.id2label
    for a, b in zip(exported.state_dict().values(), final.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert AutoTokenizer.from_pretrained(out)("apple river")["input_ids"]


def test_flexbert_export_without_a_tokenizer_is_refused(
    classification_run, pretrained, tmp_path, capsys
):
    """Config and task found but no tokenizer: nothing is written (AutoTokenizer could not
    load it), and the error names --tokenizer; with it, the export is complete."""
    from transformers import AutoTokenizer

    from flexbert.train.export import main as export_main

    run, _ = classification_run
    ckpt = _moved(run, tmp_path / "moved", "model_config.json", "task.json")
    assert export_main([str(ckpt), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexbert-export: error: no tokenizer") and "--tokenizer" in err
    assert not (tmp_path / "x").exists()
    args = [str(ckpt), "--out", str(tmp_path / "y"), "--tokenizer", str(pretrained)]
    assert export_main(args) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "y")("apple river")["input_ids"]


def test_flexbert_export_refuses_another_tokenizer_and_a_file_as_out(
    classification_run, tmp_path, capsys
):
    """A tokenizer whose ids the model was not trained with, or --out naming a file: one clear
    error each, and nothing written."""
    from flexbert.data.tokenizer import load_tokenizer, save_tokenizer
    from flexbert.train.export import main as export_main

    run, _ = classification_run
    other, grown = tmp_path / "other_tokenizer", load_tokenizer(run / "tokenizer")
    grown.add_tokens([f"<extra{i}>" for i in range(600)])  # ids past the model's vocabulary
    save_tokenizer(grown, other)
    args = [str(run), "--out", str(tmp_path / "x"), "--tokenizer", str(other)]
    assert export_main(args) == 2
    err = capsys.readouterr().err
    assert "model and tokenizer do not match" in err and not (tmp_path / "x").exists()
    (tmp_path / "a_file").write_text("keep me")
    assert export_main([str(run), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_model_path_may_be_a_hub_id(pretrained, contains_word, monkeypatch, tmp_path):
    """model.path=org/name: encoder and tokenizer come from the Hugging Face cache."""
    from tests.conftest import cache_hub_repo, offline_hub

    cache_hub_repo(offline_hub(monkeypatch, tmp_path), "flexbert-tests/tiny", pretrained)
    cfg = compose_finetune(
        ["model.path=flexbert-tests/tiny", *file_overrides(contains_word), *FAST]
        + ["trainer.max_duration=1ep", "export_hf=false"]
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["train"]["batches"] > 0
    assert "models--flexbert-tests--tiny" in summary["data"]["tokenizer"]


@pytest.mark.parametrize("name", TASKS)
def test_every_task_preset_composes(name):
    cfg = compose_finetune([f"task={name}"])
    assert cfg.task.name == name and cfg.task.text_fields and cfg.task.metrics
    from flexbert.train.tasks import TASK_TYPES

    assert cfg.task.type in TASK_TYPES
    assert cfg.task.type != "regression" or cfg.task.num_labels == 1


def test_missing_text_field_is_one_clear_error(
    pretrained, contains_word, tmp_path, monkeypatch, capsys
):
    args = [
        f"model.path={pretrained}",
        *file_overrides(contains_word),
        "task.text_fields=[sentence]",
        f"hydra.run.dir={tmp_path}",
    ]
    assert "'sentence'" in finetune_error_line(args, monkeypatch, capsys)


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("task.num_labels=1", "outside task.num_labels=1"),
        ("model.path=/nonexistent/dir", "no such directory"),
        ("task.dataset.files.train=/nonexistent/train.csv", "file not found"),
        ("data.max_seq_len=100000", "data.max_seq_len=100000 exceeds the model's max_seq_len"),
    ],
)
def test_bad_input_raises_a_clear_error(pretrained, contains_word, tmp_path, bad, expected):
    from flexbert import ConfigError
    from flexbert.data.errors import DataError

    cfg = compose_finetune([f"model.path={pretrained}", *file_overrides(contains_word), *FAST, bad])
    with pytest.raises((DataError, ConfigError, FileNotFoundError), match=expected):
        train(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "sizes, key",
    [
        (["data.batch_size=32", "data.eval_batch_size=33"], "batch_size"),
        (["data.batch_size=30", "data.eval_batch_size=32"], "eval_batch_size"),
    ],
)
def test_a_batch_the_ranks_cannot_share_evenly_is_refused(
    pretrained, contains_word, tmp_path, monkeypatch, sizes, key
):
    """On 3 ranks a batch of 32 would train at 30 (10 rows each): refused before any file."""
    from composer.utils import dist

    from flexbert import ConfigError
    from flexbert.train.finetune import build_trainer

    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    overrides = [f"model.path={pretrained}", *file_overrides(contains_word), *FAST]
    with pytest.raises(ConfigError, match=rf"data.{key}=32 must be divisible by the world size"):
        build_trainer(compose_finetune([*overrides, *sizes]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_unknown_task_type_is_one_clear_line(pretrained, tmp_path, monkeypatch, capsys):
    args = [f"model.path={pretrained}", "task.type=bogus", f"hydra.run.dir={tmp_path}"]
    last = finetune_error_line(args, monkeypatch, capsys)
    assert last.startswith("flexbert-finetune: error: task.type: unknown task type 'bogus'")
    assert "sequence_classification" in last


def test_flexbert_export_of_a_lone_fine_tuning_checkpoint_names_its_task(
    classification_run, pretrained, tmp_path, capsys
):
    """Only model_config.json beside a classifier checkpoint (no task.json): read as the MLM
    it is not, one error line that points at the run's task, and nothing written."""
    from flexbert.train.export import main as export_main

    run, _ = classification_run
    ckpt = _moved(run, tmp_path / "moved", "model_config.json")
    args = [str(ckpt), "--out", str(tmp_path / "x"), "--tokenizer", str(pretrained)]
    assert export_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexbert-export: error: the weights in") and "summary.json" in err
    assert not (tmp_path / "x").exists()


def test_two_rank_fine_tuning_counts_each_eval_row_once(pretrained, contains_word, tmp_path):
    """Two processes (gloo) fine-tune as `composer -n 2` would; 7 eval rows do not split
    evenly, so DistributedSampler repeats one: the run's accuracy must count each row once,
    equal to the exported model's on the 7 rows in one process."""
    import csv

    from flexbert import FlexBertForSequenceClassification
    from flexbert.data.tokenizer import load_tokenizer
    from tests.conftest import launch_two_ranks

    with open(contains_word["validation"], newline="") as f:
        rows = list(csv.DictReader(f))
    positive = [r for r in rows[32:] if r["label"] == "1"]
    negative = [r for r in rows[32:] if r["label"] == "0"]
    files = {"train": rows[:32], "eval": positive[:4] + negative[:3]}  # mixed labels
    for name, part in files.items():
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    worker = Path(__file__).with_name("finetune_two_ranks_worker.py")
    run = tmp_path / "run"
    args = [str(pretrained), str(tmp_path / "train.csv"), str(tmp_path / "eval.csv"), str(run)]
    launch_two_ranks(worker, *args)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["examples"]["eval"] == 7
    model = FlexBertForSequenceClassification.from_hf(run / "hf").eval()
    enc = load_tokenizer(run / "hf")(
        [r["text"] for r in files["eval"]], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        predicted = model(enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1)
    right = (predicted == torch.tensor([int(r["label"]) for r in files["eval"]])).tolist()
    once, row_0_twice = sum(right) / 7, (sum(right) + right[0]) / 8
    assert once != row_0_twice  # the check could tell them apart
    assert summary["eval"]["accuracy"] == pytest.approx(once)


def test_the_training_order_follows_the_run_seed():
    """A seed sweep varies the data order, not only the head's initialisation."""
    from flexbert.train.finetune import _loader

    rows = [{"i": i} for i in range(32)]

    def order(seed: int) -> list[int]:
        return [r["i"] for b in _loader(rows, 8, list, True, seed) for r in b]

    assert order(1) == order(1) and sorted(order(1)) == list(range(32))
    assert order(1) != order(2)
    assert [r["i"] for b in _loader(rows, 8, list, False, 1) for r in b] == list(range(32))


def test_fine_tuning_scores_the_whole_eval_split_on_a_gpu_trainer_too():
    """trainer=gpu evaluates 50 batches in pretraining; fine-tuning scores every eval row,
    and a task scored over its whole split refuses a subset."""
    from flexbert import ConfigError
    from flexbert.train.finetune import check_whole_eval

    cfg = compose_finetune(["trainer=gpu", "task=mnli"])
    assert cfg.trainer.eval_subset_num_batches == -1
    check_whole_eval(compose_finetune(["task=mnli", "trainer.eval_subset_num_batches=2"]))
    for task in ("local_retrieval", "local_colbert", "squad"):
        cfg = compose_finetune([f"task={task}", "trainer.eval_subset_num_batches=2"])
        with pytest.raises(ConfigError, match="eval_subset_num_batches=2: a .* set it to -1"):
            check_whole_eval(cfg)


def test_a_run_that_never_evaluated_is_scored_at_its_end(pretrained, contains_word, tmp_path):
    """eval_interval=0: Composer evaluates nothing during fit; the summary's metrics are the
    final weights' (not never-updated metrics computed as 0)."""
    overrides = [f"model.path={pretrained}", *file_overrides(contains_word), *FAST]
    _, summary = finetune_run(
        [*overrides, "trainer.max_duration=1ep", "trainer.eval_interval=0"], tmp_path
    )
    assert len(summary["eval_history"]) == 1
    assert summary["eval_history"][0]["batch"] == summary["train"]["batches"]
    assert summary["eval"]["accuracy"] > 0
