import json
import os

import numpy as np
import pytest

from flexbert.data.corpus import CorpusSpec
from flexbert.data.errors import DataError
from flexbert.data.mds import chunk_ids, prepare_mds, read_manifest


def read_split(path):
    from streaming import StreamingDataset

    if not json.loads((path / "index.json").read_text())["shards"]:
        return []  # an empty split (streaming refuses to open one)
    ds = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
    return [ds[i]["input_ids"] for i in range(ds.num_samples)]


@pytest.fixture
def jsonl_corpus(tmp_path):
    rows = ["short text", "", "   ", "word " * 300, "another short one", "x = 1\nprint(x)"]
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return f, rows


def test_chunk_ids_split_and_truncate():
    ids = list(range(10, 30))
    chunks = chunk_ids(ids, 1, 2, max_length=8, overflow="split")
    assert all(len(c) <= 8 and c[0] == 1 and c[-1] == 2 for c in chunks)
    assert [t for c in chunks for t in c[1:-1]] == ids
    assert chunk_ids(ids, 1, 2, 8, "truncate") == [[1, *ids[:6], 2]]


def test_round_trip_split_and_counts(tokenizer, jsonl_corpus, tmp_path):
    path, rows = jsonl_corpus
    m = prepare_mds(
        str(path), tmp_path / "out", tokenizer, max_length=32, val_fraction=0.0, progress=False
    )
    assert m["counts"]["total"]["skipped"] == 2
    assert m["counts"]["total"]["documents"] == 4
    samples = read_split(tmp_path / "out" / "train")
    assert samples[0].dtype == np.uint16
    assert len(samples) == m["counts"]["total"]["chunks"] > 4
    assert sum(len(s) for s in samples) == m["counts"]["total"]["tokens"]
    assert max(len(s) for s in samples) == 32
    # Concatenating the chunks' bodies gives back each document's exact tokens, in order.
    bodies = [t for s in samples for t in s[1:-1].tolist()]
    expected = [
        t for r in rows if r.strip() for t in tokenizer(r, add_special_tokens=False)["input_ids"]
    ]
    assert bodies == expected
    assert all(s[0] == tokenizer.cls_token_id and s[-1] == tokenizer.sep_token_id for s in samples)


def test_truncate_mode_counts_dropped_tokens(tokenizer, jsonl_corpus, tmp_path):
    path, _ = jsonl_corpus
    m = prepare_mds(
        str(path),
        tmp_path / "out",
        tokenizer,
        max_length=32,
        val_fraction=0.0,
        overflow="truncate",
        progress=False,
    )
    assert m["counts"]["total"]["chunks"] == 4
    assert m["counts"]["total"]["truncated"] > 0


def test_train_val_split_written(mds_dir):
    manifest = read_manifest(mds_dir)
    counts = manifest["counts"]
    assert counts["train"]["chunks"] > 0 and counts["val"]["chunks"] > 0
    assert len(read_split(mds_dir / "val")) == counts["val"]["chunks"]
    assert len(list((mds_dir / "train").glob("shard.*.mds.zstd"))) > 1  # small size_limit


def test_rerun_is_idempotent_and_deterministic(tokenizer, jsonl_corpus, tmp_path):
    path, _ = jsonl_corpus
    kw = dict(max_length=32, val_fraction=0.5, progress=False)
    first = prepare_mds(str(path), tmp_path / "a", tokenizer, **kw)
    mtime = os.stat(tmp_path / "a" / "manifest.json").st_mtime_ns
    again = prepare_mds(str(path), tmp_path / "a", tokenizer, **kw)
    assert again["reused"] and not first["reused"]
    assert os.stat(tmp_path / "a" / "manifest.json").st_mtime_ns == mtime
    other = prepare_mds(str(path), tmp_path / "b", tokenizer, **kw)
    for split in ("train", "val"):
        assert [s.tolist() for s in read_split(tmp_path / "a" / split)] == [
            s.tolist() for s in read_split(tmp_path / "b" / split)
        ]
    assert other["counts"] == first["counts"]
    with pytest.raises(DataError, match="different conversion"):
        prepare_mds(str(path), tmp_path / "a", tokenizer, **{**kw, "max_length": 16})
    new = prepare_mds(
        str(path), tmp_path / "a", tokenizer, **{**kw, "max_length": 16}, overwrite=True
    )
    assert not new["reused"] and read_manifest(tmp_path / "a")["settings"]["max_length"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c.jsonl"]  # no temp leftovers


@pytest.mark.parametrize("theirs", ["same", "different"])
def test_a_conversion_finished_meanwhile_elsewhere_is_never_replaced(
    tokenizer, jsonl_corpus, tmp_path, monkeypatch, theirs
):
    """One process per node prepares onto a shared filesystem: the first to finish wins, and
    its shards (which its ranks may be reading already) are not swapped away; a different
    conversion appearing meanwhile is an error, not silently replaced."""
    from flexbert.data import mds

    path, _ = jsonl_corpus
    kw = dict(max_length=32, val_fraction=0.5, progress=False)
    write, out, seen = mds._write, tmp_path / "out", {}

    def another_process_finishes_first(*args):
        counts = write(*args)
        monkeypatch.setattr(mds, "_write", write)  # the other process writes normally
        length = 32 if theirs == "same" else 16
        prepare_mds(str(path), out, tokenizer, **{**kw, "max_length": length})
        seen["manifest"] = os.stat(out / "manifest.json").st_ino
        return counts

    monkeypatch.setattr(mds, "_write", another_process_finishes_first)
    if theirs == "different":
        with pytest.raises(DataError, match="another process wrote a different conversion"):
            prepare_mds(str(path), out, tokenizer, **kw)
        assert read_manifest(out)["settings"]["max_length"] == 16
    else:
        mine = prepare_mds(str(path), out, tokenizer, **kw)
        assert mine["reused"] and mine["settings"]["max_length"] == 32
    assert os.stat(out / "manifest.json").st_ino == seen["manifest"]  # theirs, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]  # no temp leftovers


def test_failed_conversion_leaves_nothing(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match="missing text field 'text'"):
        prepare_mds(
            CorpusSpec(str(bad)), tmp_path / "out", tokenizer, max_length=32, progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_changed_input_is_not_reused(tokenizer, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("one document")
    prepare_mds(str(f), tmp_path / "out", tokenizer, max_length=32, progress=False)
    f.write_text("a different, longer document than before")
    os.utime(f, ns=(1, 1))
    with pytest.raises(DataError, match="different conversion"):
        prepare_mds(str(f), tmp_path / "out", tokenizer, max_length=32, progress=False)


def test_missing_corpus_path(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus path not found"):
        prepare_mds(str(tmp_path / "absent"), tmp_path / "out", tokenizer, progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_empty_dir_is_used_but_foreign_files_are_protected(
    tokenizer, jsonl_corpus, tmp_path
):
    path, _ = jsonl_corpus
    (tmp_path / "empty").mkdir()
    prepare_mds(str(path), tmp_path / "empty", tokenizer, max_length=32, progress=False)
    assert read_manifest(tmp_path / "empty") is not None
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="other files"):
        prepare_mds(str(path), tmp_path / "busy", tokenizer, max_length=32, progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_an_empty_val_split_is_announced_and_refused_by_training(
    tokenizer, jsonl_corpus, tmp_path, caplog
):
    from flexbert import ConfigError
    from flexbert.train.data import check_splits

    path, _ = jsonl_corpus
    with caplog.at_level("WARNING", logger="flexbert"):
        m = prepare_mds(str(path), tmp_path / "out", tokenizer, val_fraction=0.0, progress=False)
    assert "the val split holds no documents" in caplog.text
    with pytest.raises(ConfigError, match="the val split.* hold no documents"):
        check_splits(m, tmp_path / "out")
    from flexbert.data.shard_info import inspect_shards

    report = inspect_shards(tmp_path / "out", split="val")
    assert report["lengths"]["samples"] == 0 and report["samples"] == []
    check_splits({"counts": {"train": {"chunks": 3}, "val": {"chunks": 1}}}, "x")


@pytest.mark.parametrize(("setting", "value"), [("compression", "bogus"), ("size_limit", "abc")])
def test_bad_shard_settings_are_data_errors(tokenizer, jsonl_corpus, tmp_path, setting, value):
    path, _ = jsonl_corpus
    with pytest.raises(DataError, match=f"{setting}={value!r}"):
        prepare_mds(str(path), tmp_path / "out", tokenizer, progress=False, **{setting: value})
    assert not (tmp_path / "out").exists()
