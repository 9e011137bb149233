"""Composer (whose pins pyproject lifts) imports and trains FlexBERT with the torch we get."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from torch.utils.data import DataLoader

from flexbert import FlexBertForMaskedLM, ModelConfig
from flexbert.data.masking import label_positions
from flexbert.train.composer_model import ComposerFlexBertMLM
from flexbert.train.data_spec import flexbert_data_spec
from tests.conftest import ragged_batch


def _batches(n: int, packed: bool, positions: bool = False):
    out = []
    for i in range(n):
        ids, mask = ragged_batch([24, 17, 9, 24], seed=i)
        gen = torch.Generator().manual_seed(100 + i)
        labels = ids.masked_fill(~((torch.rand(ids.shape, generator=gen) < 0.3) & mask), -100)
        if packed:
            cu = torch.nn.functional.pad(mask.sum(1).cumsum(0), (1, 0)).int()
            out.append(
                {"input_ids": ids[mask], "cu_seqlens": cu, "max_seqlen": 24, "labels": labels[mask]}
            )
        else:
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        if positions:
            out[-1]["label_positions"] = label_positions(out[-1]["labels"])
    return out


def _train(packed: bool, sparse: bool, tmp_path, positions: bool = False):
    torch.manual_seed(0)
    model = ComposerFlexBertMLM(
        FlexBertForMaskedLM(ModelConfig.preset("tiny", sparse_prediction=sparse))
    )
    before = model.model.model.layers[0].attn.Wqkv.weight.detach().clone()
    data = _batches(6, packed, positions)
    loader = DataLoader(data, batch_size=None, shuffle=False)
    trainer = Trainer(
        model=model,
        train_dataloader=flexbert_data_spec(loader),
        eval_dataloader=flexbert_data_spec(DataLoader(data[:2], batch_size=None)),
        max_duration="6ba",
        device_train_microbatch_size=2,  # gradient accumulation over 2 microbatches
        optimizers=torch.optim.AdamW(model.parameters(), lr=3e-3),
        device="cpu",
        save_folder=None,
        progress_bar=False,
        log_to_console=False,
        run_name="composer-smoke",
    )
    trainer.fit()
    return model, before, trainer


def test_composer_trains_packed_sparse_mlm(tmp_path):
    model, before, trainer = _train(packed=True, sparse=True, tmp_path=tmp_path)
    assert int(trainer.state.timestamp.batch) == 6
    assert int(trainer.state.timestamp.token) == 6 * (24 + 17 + 9 + 24)  # real tokens only
    assert not torch.equal(before, model.model.model.layers[0].attn.Wqkv.weight)
    metrics = trainer.state.eval_metrics["eval"]
    assert 0.0 <= metrics["MaskedAccuracy"].compute().item() <= 1.0
    assert torch.isfinite(metrics["LanguageCrossEntropy"].compute())


@pytest.mark.parametrize("packed", [True, False])
def test_label_positions_from_the_loader_train_the_same_model(packed, tmp_path):
    """Handing the sparse head the loader's label positions changes no number: same weights
    after 6 steps of 2 microbatches, same eval metrics."""
    found, _, found_run = _train(packed, sparse=True, tmp_path=tmp_path)
    given, _, given_run = _train(packed, sparse=True, tmp_path=tmp_path, positions=True)
    for a, b in zip(found.parameters(), given.parameters()):
        torch.testing.assert_close(a, b)
    for name in ("MaskedAccuracy", "LanguageCrossEntropy"):
        torch.testing.assert_close(
            given_run.state.eval_metrics["eval"][name].compute(),
            found_run.state.eval_metrics["eval"][name].compute(),
        )


def test_the_mlm_wrapper_hands_label_positions_to_the_model_and_metrics():
    """Forward and metric selection of a packed sparse batch never wait for the device: the
    wrapper passes the loader's positions on instead of letting the head search for them."""
    from flexbert.bench.host_syncs import HostSyncRecorder

    torch.manual_seed(0)
    model = ComposerFlexBertMLM(
        FlexBertForMaskedLM(ModelConfig.preset("tiny", sparse_prediction=True))
    )
    batch = _batches(1, packed=True, positions=True)[0]

    class Seen:
        def update(self, logits, labels):
            self.logits, self.labels = logits, labels

    seen = Seen()
    with HostSyncRecorder() as syncs:
        outputs = model(batch)
        model.update_metric(batch, outputs, seen)
    assert syncs.calls == []
    labels = batch["labels"]
    assert torch.equal(seen.labels, labels[labels != -100])
    assert seen.logits.shape == (int((labels != -100).sum()), 512)
    del batch["label_positions"]  # the head finds them itself: one sync, named
    with HostSyncRecorder() as syncs:
        model(batch)
    assert [op for op, _ in syncs.calls] == ["nonzero"]


def test_composer_trains_padded_dense_mlm(tmp_path):
    model, before, trainer = _train(packed=False, sparse=False, tmp_path=tmp_path)
    assert int(trainer.state.timestamp.batch) == 6
    assert not torch.equal(before, model.model.model.layers[0].attn.Wqkv.weight)


def test_packed_split_batch_keeps_every_token_once():
    from flexbert.train.data_spec import split_batch

    batch = _batches(1, packed=True)[0]
    parts = split_batch(batch, 3)
    assert [p["cu_seqlens"].tolist() for p in parts] == [[0, 24, 41, 50], [0, 24]]
    assert [p["max_seqlen"] for p in parts] == [24, 24]
    torch.testing.assert_close(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    torch.testing.assert_close(torch.cat([p["labels"] for p in parts]), batch["labels"])


@pytest.mark.parametrize("packed", [True, False])
def test_split_batch_finds_each_parts_label_positions(packed):
    """Every part's label_positions index its own labels, so a sparse head trained on the
    microbatches sees exactly the labelled tokens, and the labelled-token counts add up."""
    from flexbert.train.data_spec import num_label_tokens, split_batch

    batch = _batches(1, packed=packed, positions=True)[0]
    parts = split_batch(batch, 3 if packed else 2)
    assert len(parts) == 2
    for part in parts:
        positions = part["label_positions"]
        assert torch.equal(positions, (part["labels"].flatten() != -100).nonzero().flatten())
        assert num_label_tokens(part) > 0
    assert sum(num_label_tokens(p) for p in parts) == int((batch["labels"] != -100).sum())


def test_flops_per_batch_counts_each_sequence_and_the_decoded_tokens():
    """What SpeedMonitor turns into flops/s and MFU: 3 x forward, attention per sequence."""
    from flexbert.flops import forward_flops_per_token, mlm_head_flops_per_token

    for sparse in (True, False):
        cfg = ModelConfig.preset("tiny", sparse_prediction=sparse)
        model = ComposerFlexBertMLM(FlexBertForMaskedLM(cfg))
        packed = _batches(1, packed=True, positions=True)[0]
        lengths = [24, 17, 9, 24]
        decoded = int((packed["labels"] != -100).sum()) if sparse else sum(lengths)
        encoder = sum(n * forward_flops_per_token(cfg, n) for n in lengths)
        expected = 3 * (encoder + decoded * mlm_head_flops_per_token(cfg))
        assert model.flops_per_batch(packed) == pytest.approx(expected)
        padded = _batches(1, packed=False, positions=True)[0]  # same documents, padded
        assert model.flops_per_batch(padded) == pytest.approx(expected)
        step = {"microbatches": [packed, packed]}
        assert model.flops_per_batch(step) == pytest.approx(2 * expected)


def test_speed_monitor_logs_flops_per_second(tmp_path):
    from composer.callbacks import SpeedMonitor
    from composer.loggers import InMemoryLogger

    torch.manual_seed(0)
    model = ComposerFlexBertMLM(FlexBertForMaskedLM(ModelConfig.preset("tiny")))
    logged = InMemoryLogger()
    Trainer(
        model=model,
        train_dataloader=flexbert_data_spec(DataLoader(_batches(4, True), batch_size=None)),
        max_duration="4ba",
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        device="cpu",
        device_train_microbatch_size=4,
        callbacks=[SpeedMonitor(window_size=2)],
        loggers=[logged],
        progress_bar=False,
        log_to_console=False,
    ).fit()
    flops = [v for _, v in logged.data["throughput/flops_per_sec"]]
    assert flops and all(v > 0 for v in flops)


@pytest.mark.parametrize("sparse", [True, False])
def test_per_stream_metrics_split_the_combined_ones(sparse):
    """Each stream's metrics see exactly its own labelled tokens: their counts and sums add
    up to the combined metric's, and they survive Composer's deep copy of eval metrics."""
    import copy

    torch.manual_seed(0)
    model = ComposerFlexBertMLM(
        FlexBertForMaskedLM(ModelConfig.preset("tiny", sparse_prediction=sparse)), ["a", "b"]
    )
    metrics = copy.deepcopy(model.val_metrics)
    assert set(metrics) == {
        "MaskedAccuracy",
        "LanguageCrossEntropy",
        "MaskedAccuracy/a",
        "LanguageCrossEntropy/a",
        "MaskedAccuracy/b",
        "LanguageCrossEntropy/b",
    }
    expected = {s: {"total": 0, "correct": 0, "loss": 0.0} for s in (0, 1)}
    for batch in _batches(3, packed=True, positions=True):
        lengths = [24, 17, 9, 24]
        batch["stream_ids"] = torch.repeat_interleave(
            torch.tensor([0, 1, 1, 0]), torch.tensor(lengths)
        )
        model.eval()
        with torch.no_grad():
            outputs = model.eval_forward(batch)
        for metric in metrics.values():
            model.update_metric(batch, outputs, metric)
        # by hand: the labelled tokens of each stream, their logits picked by position
        positions = batch["label_positions"]
        logits = outputs.logits if sparse else outputs.logits[positions]
        labels, streams = batch["labels"][positions], batch["stream_ids"][positions]
        for s in (0, 1):
            mine = streams == s
            expected[s]["total"] += int(mine.sum())
            expected[s]["correct"] += int((logits[mine].argmax(-1) == labels[mine]).sum())
            loss = torch.nn.functional.cross_entropy(logits[mine], labels[mine], reduction="sum")
            expected[s]["loss"] += float(loss)
    for s, name in ((0, "a"), (1, "b")):
        assert int(metrics[f"MaskedAccuracy/{name}"].total) == expected[s]["total"]
        assert int(metrics[f"MaskedAccuracy/{name}"].correct) == expected[s]["correct"]
        ce = metrics[f"LanguageCrossEntropy/{name}"]
        assert float(ce.sum_loss) == pytest.approx(expected[s]["loss"], rel=1e-5)
    acc = {k: v for k, v in metrics.items() if k.startswith("MaskedAccuracy")}
    ce = {k: v for k, v in metrics.items() if k.startswith("LanguageCrossEntropy")}
    for name in ("total", "correct"):
        parts = getattr(acc["MaskedAccuracy/a"], name) + getattr(acc["MaskedAccuracy/b"], name)
        assert parts == getattr(acc["MaskedAccuracy"], name)
    assert acc["MaskedAccuracy/a"].total > 0 and acc["MaskedAccuracy/b"].total > 0
    a, b, both = (
        ce["LanguageCrossEntropy/a"],
        ce["LanguageCrossEntropy/b"],
        ce["LanguageCrossEntropy"],
    )
    assert a.total_items > 0 and b.total_items > 0
    assert a.total_items + b.total_items == both.total_items
    torch.testing.assert_close(a.sum_loss + b.sum_loss, both.sum_loss)
    assert not torch.isclose(a.compute(), b.compute())  # different tokens, different losses


def test_a_finished_run_lets_its_model_be_collected(tmp_path):
    """Composer's atexit hook held every closed trainer's state (model, optimizer, loaders)
    until the process exited; finish_run releases it."""
    import gc
    import weakref

    from flexbert.train.app import finish_run

    model, _, trainer = _train(packed=True, sparse=False, tmp_path=tmp_path)
    alive = weakref.ref(model)
    finish_run(trainer, tmp_path, {}, main=False)
    del model, trainer
    gc.collect()
    assert alive() is None


def test_releasing_closed_trainers_keeps_the_exit_close_of_open_ones(tmp_path, monkeypatch):
    """atexit drops every engine's close at once; the ones still open get theirs back."""
    import atexit

    from composer.core.engine import Engine

    from flexbert.train.app import release_closed_trainers

    _, _, still_open = _train(packed=True, sparse=False, tmp_path=tmp_path)
    _, _, closed = _train(packed=True, sparse=False, tmp_path=tmp_path)
    closed.close()
    registered = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args: registered.append((fn, args)))
    release_closed_trainers()
    states = [args[0] for fn, args in registered if fn is Engine._close]
    assert any(s is still_open.state for s in states)
    assert not any(s is closed.state for s in states)
    still_open.close()
