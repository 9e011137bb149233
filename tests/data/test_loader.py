import shutil

import numpy as np
import pytest
import torch

from flexbert.data.collate import PaddedMLMCollator
from flexbert.data.errors import DataError
from flexbert.data.loader import PackedMLMLoader, padded_loader, streaming_dataset
from flexbert.data.masking import IGNORE_INDEX, MLMMasker


@pytest.fixture
def shards(mds_dir, tmp_path):
    """A private copy, so each test's StreamingDataset owns its local directory."""
    return shutil.copytree(mds_dir, tmp_path / "shards")


def make_loader(shards, tokenizer, seed=5, shuffle=True, **kw):
    ds = streaming_dataset(shards, split="train", shuffle=shuffle, seed=seed, batch_size=16)
    masker = MLMMasker.from_tokenizer(tokenizer, 0.3)
    return PackedMLMLoader(
        ds, 2, 128, masker, tokenizer.pad_token_id, buffer_size=32, seed=seed, **kw
    )


def same(a, b):
    return (
        torch.equal(a["input_ids"], b["input_ids"])
        and torch.equal(a["labels"], b["labels"])
        and torch.equal(a["cu_seqlens"], b["cu_seqlens"])
        and a["max_seqlen"] == b["max_seqlen"]
    )


def test_packed_batches_for_the_model(shards, tokenizer):
    loader = make_loader(shards, tokenizer)
    batches = list(loader)
    assert len(batches) > 5
    for b in batches:
        assert set(b) == {"input_ids", "cu_seqlens", "max_seqlen", "labels", "label_positions"}
        assert torch.equal(b["label_positions"], (b["labels"] != IGNORE_INDEX).nonzero()[:, 0])
        assert b["input_ids"].dtype == torch.int64 and b["input_ids"].dim() == 1
        assert b["labels"].shape == b["input_ids"].shape
        assert b["cu_seqlens"][-1] == len(b["input_ids"]) <= 2 * 128
        assert isinstance(b["max_seqlen"], int)
        starts = b["cu_seqlens"][:-1].long()
        assert (b["input_ids"][starts] == tokenizer.cls_token_id).all()  # CLS is never masked
    masked = torch.cat([b["labels"] != IGNORE_INDEX for b in batches]).float().mean().item()
    assert 0.2 < masked < 0.3  # 30% of the non-special tokens
    assert loader.efficiency > 0.9


def test_shuffle_is_seeded(shards, tokenizer):
    def order(seed):
        return [
            d["index"] for d in streaming_dataset(shards, split="train", seed=seed, batch_size=16)
        ]

    first = order(5)
    assert first == order(5)
    assert first != order(6) and sorted(first) == sorted(order(6))
    a = list(make_loader(shards, tokenizer, seed=5, prefetch=0))
    b = list(make_loader(shards, tokenizer, seed=5))
    assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def resumed_batches(shards, tokenizer, state, **kw):
    """The batches of a fresh loader that loads `state` (as Composer resumes), and it."""
    loader = make_loader(shards, tokenizer, **kw)
    loader.dataset.load_state_dict(state)
    return list(loader), loader


def same_batches(a, b):
    return len(a) == len(b) > 0 and all(same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("k", [1, 4])
def test_resume_mid_epoch_gives_the_same_next_batches(shards, tokenizer, k):
    loader = make_loader(shards, tokenizer)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.dataset.state_dict(num_samples=999, from_beginning=True)  # as Composer calls it
    rest = list(it)
    del it, loader
    again, resumed = resumed_batches(shards, tokenizer, state)
    assert same_batches(rest, again)
    # The next epoch starts fresh and covers the whole split again.
    assert len(list(resumed)) == len(rest) + k


def test_a_state_saved_at_the_end_of_an_epoch_resumes_with_the_next_epoch(shards, tokenizer):
    """What Composer saves at an epoch checkpoint: the next iteration is the next epoch, not
    an empty replay of the finished one (which cost an epoch-limited run a data epoch)."""
    loader = make_loader(shards, tokenizer, prefetch=0)
    list(loader)
    state = loader.dataset.state_dict(num_samples=0, from_beginning=True)
    second = list(loader)
    del loader
    assert same_batches(second, resumed_batches(shards, tokenizer, state, prefetch=0)[0])


def test_a_state_saved_again_before_any_batch_keeps_the_position(shards, tokenizer):
    loader = make_loader(shards, tokenizer, prefetch=0)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.dataset.state_dict(num_samples=0, from_beginning=True)
    rest = list(it)
    del it, loader
    reloaded = make_loader(shards, tokenizer, prefetch=0)
    reloaded.dataset.load_state_dict(state)
    saved_again = reloaded.dataset.state_dict(num_samples=0, from_beginning=True)
    assert saved_again["ranks"] == state["ranks"] and saved_again["batches"] == 3
    assert saved_again["dataset"]["sample_in_epoch"] == state["dataset"]["sample_in_epoch"]
    del reloaded
    assert same_batches(rest, resumed_batches(shards, tokenizer, saved_again, prefetch=0)[0])


def test_padded_streaming_loader(shards, tokenizer):
    ds = streaming_dataset(shards, split="val", shuffle=False, batch_size=4)
    collator = PaddedMLMCollator(
        tokenizer.pad_token_id,
        64,
        MLMMasker.from_tokenizer(tokenizer, 0.15),
        generator=torch.Generator().manual_seed(0),
    )
    loader = padded_loader(ds, 4, collator)
    batch = next(iter(loader))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 4
    raw = [ds[i]["input_ids"] for i in range(4)]
    assert mask.sum(1).tolist() == [len(r) for r in raw]
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    positions = batch["label_positions"]  # into the flattened (B * L) labels
    assert torch.equal(positions, (labels.flatten() != IGNORE_INDEX).nonzero()[:, 0])
    assert loader.state_dict()["sample_in_epoch"] == 4


def test_padded_collator_fixed_length():
    collate = PaddedMLMCollator(pad_token_id=0, max_seq_len=6, pad_to=8)
    out = collate([np.array([1, 5, 6, 2]), {"input_ids": np.arange(1, 11)}])
    assert out["input_ids"].shape == (2, 8)
    assert out["attention_mask"].sum(1).tolist() == [4, 6]


def test_missing_and_corrupt_shards(shards, tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="index.json"):
        streaming_dataset(tmp_path / "nowhere", split="train")
    (shards / "val" / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt MDS index"):
        streaming_dataset(shards, split="val")
    shard = sorted((shards / "train").glob("shard.*"))[0]
    stem = shard.name.split(".mds")[0]  # shard.00000: its compressed and raw forms both go
    for f in (shards / "train").glob(stem + ".mds*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=stem):
        streaming_dataset(shards, split="train")


def test_corrupt_shard_bytes(mds_dir, tmp_path):
    local = shutil.copytree(mds_dir / "val", tmp_path / "val")
    for shard in local.glob("shard.*"):
        shard.write_bytes(b"\x00garbage" * 10)
    ds = streaming_dataset(local, shuffle=False, batch_size=1)
    with pytest.raises(DataError, match="cannot read sample 0"):
        ds[0]


@pytest.mark.parametrize("fixed", [True, False])
def test_eval_passes_reuse_the_same_masks_only_with_fixed_masks(shards, tokenizer, fixed):
    ds = streaming_dataset(shards, split="val", shuffle=False, batch_size=16)
    masker = MLMMasker.from_tokenizer(tokenizer, 0.15)
    loader = PackedMLMLoader(
        ds, 2, 128, masker, tokenizer.pad_token_id, buffer_size=32, seed=3, fixed_masks=fixed
    )
    first, second = list(loader), list(loader)
    assert len(first) == len(second) > 0
    assert all(same(a, b) for a, b in zip(first, second)) is fixed


def test_padded_masks_follow_the_documents_not_the_call_order():
    masker = MLMMasker(mask_token_id=3, allowed_ids=range(10, 60), special_ids=[0, 1, 2])
    collate = PaddedMLMCollator(pad_token_id=0, max_seq_len=40, masker=masker, seed=7)
    docs = [{"input_ids": np.arange(10, 50), "index": i} for i in (4, 9)]
    other = [{"input_ids": np.arange(10, 50), "index": i} for i in (5, 9)]
    a, _, b = collate(docs), collate(other), collate(docs)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["labels"], collate(other)["labels"])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_eval_loader_waits_for_the_last_rank_with_empty_batches(
    shards, tokenizer, monkeypatch, prefetch
):
    """finish_every_rank: this rank's own batches, then empty ones while (simulated) another
    rank still reads, then the end together; a training loader stops with the first rank."""
    import flexbert.data.loader as loader_module

    own = list(make_loader(shards, tokenizer, prefetch=prefetch, shuffle=False))
    for finish, extra in ((True, 2), (False, 0)):
        calls = {"left": 2}

        def other_rank_reads(flag: bool, calls=calls) -> bool:  # another rank: 2 more batches
            calls["left"] -= not flag
            return flag or calls["left"] >= 0

        def other_rank_done(flag: bool) -> bool:  # all_ranks: that rank has finished too
            return flag

        monkeypatch.setattr(loader_module, "any_rank", other_rank_reads)
        monkeypatch.setattr(loader_module, "all_ranks", other_rank_done)
        loader = make_loader(
            shards, tokenizer, prefetch=prefetch, shuffle=False, finish_every_rank=finish
        )
        batches = list(loader)
        assert len(batches) == len(own) + extra
        assert all(same(a, b) for a, b in zip(own, batches))
        for empty in batches[len(own) :]:
            assert empty["input_ids"].tolist() == [tokenizer.pad_token_id]
            assert (
                empty["labels"].tolist() == [IGNORE_INDEX] and empty["label_positions"].numel() == 0
            )
    assert loader._batches == len(own)  # the empty batches are not part of the epoch


@pytest.mark.parametrize("sparse", [True, False])
def test_an_empty_eval_batch_changes_no_metric(shards, tokenizer, sparse):
    """What a finished rank evaluates meanwhile: runs through the model (dense or sparse
    head, no labelled token) and leaves every metric, per-stream ones included, as it was."""
    from flexbert import FlexBertForMaskedLM, ModelConfig
    from flexbert.train.composer_model import ComposerFlexBertMLM

    cfg = ModelConfig.preset(
        "tiny", vocab_size=512, pad_token_id=tokenizer.pad_token_id, sparse_prediction=sparse
    )
    model = ComposerFlexBertMLM(FlexBertForMaskedLM(cfg).eval(), ["a"])
    loader = make_loader(shards, tokenizer, stream_ids=False)
    real = next(iter(loader))
    real["stream_ids"] = torch.zeros_like(real["input_ids"])  # every token from stream "a"
    loader.stream_ids = True
    empty = loader.empty_batch()
    assert empty["stream_ids"].tolist() == [-1]
    with torch.no_grad():
        for metric in model.val_metrics.values():
            model.update_metric(real, model.eval_forward(real), metric)
        before = {k: float(m.compute()) for k, m in model.val_metrics.items()}
        for metric in model.val_metrics.values():
            model.update_metric(empty, model.eval_forward(empty), metric)
        after = {k: float(m.compute()) for k, m in model.val_metrics.items()}
    assert after == before and len(before) == 4


@pytest.mark.slow
def test_two_ranks_resume_each_their_own_packer_exactly(shards, tokenizer, tokenizer_dir, tmp_path):
    """Two processes (torch.distributed.run, gloo): every rank continues exactly after
    resumption, and both ranks end the epoch at the same batch; evaluation (packed and
    padded, the latter as Composer takes it) reads every document exactly once, the ranks
    in step."""
    from pathlib import Path

    from flexbert.data.mds import prepare_mds
    from tests.conftest import launch_two_ranks

    out = tmp_path / "ranks"
    out.mkdir()
    corpus = tmp_path / "odd.jsonl"  # 41 documents: one rank reads one more than the other
    corpus.write_text("".join(f'{{"text": "document {i} of the odd split"}}\n' for i in range(41)))
    odd = tmp_path / "odd"
    prepare_mds(str(corpus), odd, tokenizer, max_length=64, val_fraction=0.0, progress=False)
    worker = Path(__file__).with_name("multirank_resume_worker.py")
    launch_two_ranks(worker, str(shards), str(tokenizer_dir), str(out), "20", str(odd))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    state = ranks[0]["state"]
    assert len(state["ranks"]) == 2 and state == ranks[1]["state"]  # gathered, the same on all
    consumed = [r["consumed"] for r in state["ranks"]]
    assert consumed[0] != consumed[1]  # one rank re-reads documents beyond the shared count
    assert state["dataset"]["sample_in_epoch"] == 2 * min(consumed)
    for r in ranks:
        assert len(r["again"]) == len(r["rest"]) > 0
        assert all(same(a, b) for a, b in zip(r["rest"], r["again"]))
    assert len(ranks[0]["rest"]) == len(ranks[1]["rest"])  # the epoch ends together
    ids = [torch.cat([b["input_ids"] for b in r["first"] + r["rest"]]) for r in ranks]
    assert not torch.equal(ids[0][:200], ids[1][:200])  # each rank reads its own documents
    # an evaluation loader reads every rank's documents to the end, the ranks in step (empty
    # batches, 0 tokens here, on the rank that finished first); a training one stops early
    evals, trains = ([r["reads"][finish] for r in ranks] for finish in (True, False))
    assert len(evals[0]) == len(evals[1]) and len(trains[0]) == len(trains[1])
    assert sum(map(sum, evals)) > sum(map(sum, trains))
    # ... each document exactly once over both ranks, packed or padded (streaming's own
    # partition repeats a document when the split does not divide by the number of ranks)
    split = streaming_dataset(odd, split="train", shuffle=False, batch_size=16)
    assert split.num_samples == 41  # odd, so a repeated document would show
    tokens = sum(len(split[i]["input_ids"]) for i in range(split.num_samples))
    assert sum(map(sum, (r["odd_reads"] for r in ranks))) == tokens
    padded = [r["padded"] for r in ranks]
    assert len(padded[0]) == len(padded[1]) and sum(map(sum, padded)) == tokens
    assert 0 in evals[0] + evals[1] and 0 not in trains[0] + trains[1]
    for ev in evals:  # a rank's empty batches only follow all of its own
        waiting = ev[ev.index(0) :] if 0 in ev else []
        assert waiting == [0] * len(waiting)
    whole = streaming_dataset(shards, split="train", shuffle=False, batch_size=16)
    assert sum(map(sum, evals)) == sum(len(whole[i]["input_ids"]) for i in range(whole.num_samples))


def test_resuming_on_another_number_of_ranks_warns_and_continues(shards, tokenizer, caplog):
    loader = make_loader(shards, tokenizer)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    rest = len(list(it))
    del it, loader
    two = {**state, "ranks": state["ranks"] * 2}  # as if saved by two ranks
    two["dataset"] = {**state["dataset"], "sample_in_epoch": 2 * state["ranks"][0]["consumed"]}
    resumed = make_loader(shards, tokenizer)
    with caplog.at_level("WARNING", logger="flexbert.data.loader"):
        resumed.load_state_dict(two)
    assert "resuming on 1 ranks from a state of 2" in caplog.text
    assert 0 < len(list(resumed)) < rest  # the buffered pieces are not read again


def test_a_missing_compressed_shard_is_refused_and_its_decompressed_copy_kept(shards):
    """With a .zstd shard gone but its decompressed .mds left, the streaming library would
    delete the .mds when the dataset opens; the check refuses first and names the shard."""
    from flexbert.data.errors import DataFileNotFoundError

    train = shards / "train"
    zipped = sorted(train.glob("*.mds.zstd"))[0]
    raw = zipped.with_suffix("")
    raw.write_bytes(b"decompressed")  # what a read leaves beside the .zstd
    zipped.unlink()
    with pytest.raises(DataFileNotFoundError, match=f"{zipped.name} .*missing .*only its"):
        streaming_dataset(shards, split="train", shuffle=False, batch_size=16)
    assert raw.read_bytes() == b"decompressed"


def test_a_shard_that_fails_to_decompress_mid_epoch_is_an_error_not_an_early_end(mds_dir, tmp_path):
    """Iterating, the streaming library decompresses shards in a background thread; when that
    fails it only stops the sample loop, which looks like the epoch's end (a checkpoint would
    then skip the rest for good). The iteration raises a DataError naming the shard instead."""
    local = shutil.copytree(mds_dir / "train", tmp_path / "train")
    zipped = sorted(local.glob("shard.*.mds.zstd"))
    assert len(zipped) > 2
    bad = zipped[len(zipped) // 2]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    ds = streaming_dataset(local, shuffle=False, batch_size=1)
    with pytest.raises(DataError, match=rf"cannot prepare shard .*{bad.name}.*prepare"):
        for _ in ds:
            pass
