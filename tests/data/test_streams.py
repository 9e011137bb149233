"""Data mixtures: several MDS streams read as one dataset, in the configured shares."""

from __future__ import annotations

import json
import shutil

import pytest

from flexbert.data.errors import DataError
from flexbert.data.loader import StreamSpec, streaming_dataset
from flexbert.data.mds import check_manifest_tokenizer, prepare_mds, read_manifest


@pytest.fixture(scope="module")
def first_mds(mds_dir, tmp_path_factory):
    """A copy of the shared conversion: reading shards leaves decompressed files behind."""
    return shutil.copytree(mds_dir, tmp_path_factory.mktemp("first") / "shards")


@pytest.fixture(scope="module")
def second_mds(tokenizer, tmp_path_factory):
    """A second conversion, of different documents (JSON lines of repeated phrases)."""
    root = tmp_path_factory.mktemp("second")
    lines = [json.dumps({"text": f"stream two document {i} " * 20}) for i in range(300)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "shards"
    prepare_mds(
        str(root / "docs.jsonl"), out, tokenizer, max_length=64, val_fraction=0.2, progress=False
    )
    return out


def _epoch_indices(ds):
    for sample in ds:
        yield sample["index"]


def _origins(ds, first_count: int) -> tuple[int, int]:
    """(from the first stream, from the second): sample ids are numbered stream by stream."""
    ids = list(_epoch_indices(ds))
    first = sum(1 for i in ids if i < first_count)
    return first, len(ids) - first


@pytest.mark.parametrize(("a", "b"), [(0.75, 0.25), (0.2, 0.8)])
def test_proportions_set_each_streams_share_of_an_epoch(first_mds, second_mds, a, b):
    mds_dir = first_mds
    first_count = read_manifest(mds_dir)["counts"]["train"]["chunks"]
    streams = [
        StreamSpec("one", str(mds_dir), proportion=a),
        StreamSpec("two", str(second_mds), proportion=b),
    ]
    ds = streaming_dataset(None, split="train", shuffle=True, seed=3, batch_size=8, streams=streams)
    one, two = _origins(ds, first_count)
    assert one + two == ds.num_samples
    assert one / (one + two) == pytest.approx(a, abs=0.02)


def test_unweighted_streams_read_everything_once(first_mds, second_mds):
    mds_dir = first_mds
    counts = [read_manifest(d)["counts"]["val"]["chunks"] for d in (mds_dir, second_mds)]
    streams = [StreamSpec("one", str(mds_dir)), StreamSpec("two", str(second_mds))]
    ds = streaming_dataset(None, split="val", shuffle=False, batch_size=8, streams=streams)
    indices = list(_epoch_indices(ds))
    assert sorted(indices) == list(range(sum(counts)))
    assert ds.local_of(0) == str(mds_dir) and ds.local_of(sum(counts) - 1) == str(second_mds)


def test_a_stream_without_shards_is_named(first_mds, tmp_path):
    mds_dir = first_mds
    streams = [StreamSpec("one", str(mds_dir)), StreamSpec("gone", str(tmp_path / "nope"))]
    with pytest.raises(DataError, match="nope"):
        streaming_dataset(None, split="train", streams=streams)


def test_shards_of_another_tokenizer_are_refused(mds_dir):
    from flexbert.data.corpus import CorpusSpec
    from flexbert.data.tokenizer import train_tokenizer

    other = train_tokenizer(CorpusSpec(source="stdlib", max_bytes=30_000).texts(), vocab_size=640)
    with pytest.raises(DataError, match="prepared with another tokenizer.*vocab_size"):
        check_manifest_tokenizer(read_manifest(mds_dir), other, mds_dir)


def _stream_token_totals(ds) -> list[int]:
    totals = [0] * len(ds.streams)
    for sample in ds:
        totals[ds.stream_of(sample["index"])] += len(sample["input_ids"])
    return totals


def test_packed_eval_batches_say_which_stream_each_token_came_from(
    first_mds, second_mds, tokenizer
):
    """Every token of an epoch is attributed to its own stream: per-stream token totals of
    the packed batches equal those of the documents (pieces and packing included)."""
    import torch

    from flexbert.data.loader import PackedMLMLoader
    from flexbert.data.masking import MLMMasker

    streams = [StreamSpec("one", str(first_mds)), StreamSpec("two", str(second_mds))]
    ds = streaming_dataset(None, split="val", shuffle=False, batch_size=8, streams=streams)
    expected = _stream_token_totals(ds)
    assert all(expected)
    masker = MLMMasker.from_tokenizer(tokenizer, 0.15)
    loader = PackedMLMLoader(ds, 4, 64, masker, tokenizer.pad_token_id, stream_ids=True)
    got = [0, 0]
    for batch in loader:
        ids = batch["stream_ids"]
        assert ids.shape == batch["input_ids"].shape and ((ids == 0) | (ids == 1)).all()
        starts = batch["cu_seqlens"][:-1].long()
        ends = batch["cu_seqlens"][1:].long() - 1
        assert torch.equal(ids[starts], ids[ends])  # one stream per packed sequence
        got = [got[s] + int((ids == s).sum()) for s in (0, 1)]
    assert got == expected


def test_padded_eval_rows_say_their_stream(first_mds, second_mds, tokenizer):
    from flexbert.data.collate import PaddedMLMCollator

    streams = [StreamSpec("one", str(first_mds)), StreamSpec("two", str(second_mds))]
    ds = streaming_dataset(None, split="val", shuffle=False, batch_size=8, streams=streams)
    docs = [ds[0], ds[ds.num_samples - 1]]
    batch = PaddedMLMCollator(0, 64, seed=1, stream_of=ds.stream_of)(docs)
    mask = batch["attention_mask"].bool()
    assert batch["stream_ids"][0][mask[0]].unique().tolist() == [0]
    assert batch["stream_ids"][1][mask[1]].unique().tolist() == [1]
    assert (batch["stream_ids"][~mask] == -1).all()
