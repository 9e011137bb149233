"""Where pretraining reads its data: shards from a remote into a local cache, a mixture of
streams (weights, per-stream evaluation) and the one-line errors for bad stream configs."""

from __future__ import annotations

import shutil

import pytest

from flexbert import ConfigError
from flexbert.train.pretrain import train
from tests.train.conftest import SHORT_RUN


def test_shards_stream_from_a_remote_into_the_local_cache(first_run, tiny_run_config, tmp_path):
    """data.mds.remote (here a directory standing in for an object store) is read through
    mosaicml-streaming's cache in data.mds.dir, as a multi-node run reads s3://..."""
    root, _, first = first_run
    cache = tmp_path / "mds_cache"
    cfg = tiny_run_config(
        "data.corpus=null",
        f"data.tokenizer.path={root / 'run' / 'tokenizer'}",
        f"data.mds.remote={first['data']['mds_dir']}",
        f"data.mds.dir={cache}",
        *SHORT_RUN,
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["train"]["batches"] == 2
    assert (cache / "train" / "index.json").exists() and (cache / "val" / "index.json").exists()
    assert list((cache / "train").glob("shard.*.mds*"))  # shards were fetched into the cache


def test_a_mixture_of_streams_trains_and_is_recorded(first_run, tiny_run_config, tmp_path):
    root, _, first = first_run
    code = tmp_path / "code_shards"
    shutil.copytree(first["data"]["mds_dir"], code)
    streams = f"{{web: {{dir: '{first['data']['mds_dir']}', proportion: 0.7}}, code: {{dir: '{code}', proportion: 0.3}}}}"
    cfg = tiny_run_config(
        "data.corpus=null",
        f"data.tokenizer.path={root / 'run' / 'tokenizer'}",
        f"data.mds.streams={streams}",
        "data.eval_per_stream=true",
        "trainer.eval_subset_num_batches=-1",
        *SHORT_RUN,
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["train"]["batches"] == 2 and summary["data"]["mds_dir"] is None
    assert [s["name"] for s in summary["data"]["streams"]] == ["web", "code"]
    assert [s["proportion"] for s in summary["data"]["streams"]] == [0.7, 0.3]
    assert set(summary["data"]["counts"]) == {"web", "code"}
    # each source evaluated on its own tokens too; code is a copy of web: the same text
    ev = summary["eval"]
    for metric in ("MaskedAccuracy", "LanguageCrossEntropy", "Perplexity"):
        assert {f"{metric}/web", f"{metric}/code"} <= set(ev)
    assert ev["LanguageCrossEntropy/web"] == pytest.approx(ev["LanguageCrossEntropy/code"], rel=0.1)


def test_a_stream_name_that_cannot_name_metrics_is_refused():
    from omegaconf import OmegaConf

    from flexbert.train.data import stream_specs

    data = OmegaConf.create({"mds": {"streams": {"wiki(en": {"dir": "/x"}}}})
    with pytest.raises(ConfigError, match=r"name 'wiki\(en' may hold only letters"):
        stream_specs(data)
    ok = OmegaConf.create({"mds": {"streams": {"wiki-en_2.0": {"dir": "/x"}}}})
    assert [s.name for s in stream_specs(ok)] == ["wiki-en_2.0"]


def test_per_stream_eval_needs_a_mixture(tiny_run_config):
    from flexbert.train.data import eval_stream_names

    cfg = tiny_run_config("data.eval_per_stream=true")
    with pytest.raises(ConfigError, match=r"eval_per_stream=true needs a mixture"):
        eval_stream_names(cfg.data)
    assert eval_stream_names(tiny_run_config().data) is None
    mixture = tiny_run_config(
        "data.corpus=null", "data.mds.streams={a: {dir: /x}}", "data.eval_per_stream=true"
    )
    with pytest.raises(ConfigError, match=r"eval_subset_num_batches=-1 \(got 50\)"):
        eval_stream_names(mixture.data, 50)
    assert eval_stream_names(mixture.data, -1) == ["a"]


@pytest.mark.parametrize(
    ("streams", "needle"),
    [
        ("{a: {dir: /x, weight: 2}}", r"unknown key\(s\) \['weight'\]"),
        ("{a: {remote: 's3://b/x'}}", "data.mds.streams.a.dir is required"),
        (
            "{a: {dir: /x, proportion: 0.5}, b: {dir: /y}}",
            r"every stream needs one \(missing: \['b'\]\)",
        ),
        ("{a: {dir: /x, proportion: 0.5, repeat: 2}}", "at most one of"),
    ],
)
def test_bad_streams_are_one_clear_error(tiny_run_config, streams, needle):
    from flexbert.train.data import get_shards

    cfg = tiny_run_config("data.corpus=null", f"data.mds.streams={streams}")
    with pytest.raises(ConfigError, match=needle):
        get_shards(cfg.data, tokenizer=None, cache_dir=None)


def test_streams_and_a_corpus_together_are_refused(tiny_run_config):
    from flexbert.train.data import get_shards

    cfg = tiny_run_config("data.mds.streams={a: {dir: /x}}")
    with pytest.raises(ConfigError, match="set data.corpus=null"):
        get_shards(cfg.data, tokenizer=None, cache_dir=None)


def test_padded_rows_refuse_shards_of_longer_documents():
    """Padded rows would cut longer documents to data.seq_len (their ends silently lost);
    packed rows split them, and shards of the row length are fine either way."""
    from omegaconf import OmegaConf

    from flexbert.train.data import check_shard_length

    data = OmegaConf.create({"seq_len": 32})
    longer = {"settings": {"max_length": 64}}
    with pytest.raises(ConfigError, match="up to 64 tokens .* data.seq_len=32"):
        check_shard_length(data, "padded", longer)
    check_shard_length(data, "unpadded", longer)
    check_shard_length(data, "padded", {"settings": {"max_length": 32}})
    check_shard_length(data, "padded", None)  # shards without a manifest: nothing to check


def test_packed_rows_warn_when_the_shards_hold_only_shorter_documents(caplog):
    """A context extension to 8192 on shards of 1024-token documents never attends further
    than 1024 tokens: said, naming the --max-length to prepare them with."""
    from omegaconf import OmegaConf

    from flexbert.train.data import check_shard_length

    with caplog.at_level("WARNING"):
        check_shard_length(
            OmegaConf.create({"seq_len": 8192}), "unpadded", {"settings": {"max_length": 1024}}
        )
    assert "at most 1024 tokens" in caplog.text and "--max-length 8192" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_shard_length(
            OmegaConf.create({"seq_len": 1024}), "unpadded", {"settings": {"max_length": 1024}}
        )
    assert caplog.text == ""


def test_a_remote_manifest_is_fetched_so_the_tokenizer_is_checked(
    first_run, tiny_run_config, tmp_path, caplog
):
    """data.mds.remote: the shards' manifest.json comes from the remote into the local cache,
    so shards of another tokenizer are refused as local ones are; a remote without one is a
    warning, and an older local copy is not taken for it."""
    from flexbert.data.corpus import CorpusSpec
    from flexbert.data.errors import DataError
    from flexbert.data.mds import read_manifest
    from flexbert.data.tokenizer import load_tokenizer, train_tokenizer
    from flexbert.train.data import get_shards

    root, _, first = first_run
    remote, cache = first["data"]["mds_dir"], tmp_path / "cache"
    cfg = tiny_run_config("data.corpus=null", f"data.mds.remote={remote}", f"data.mds.dir={cache}")
    tokenizer = load_tokenizer(root / "run" / "tokenizer")
    _, manifest = get_shards(cfg.data, tokenizer, cache_dir=None)
    assert manifest == read_manifest(remote) and (cache / "manifest.json").exists()
    other = train_tokenizer(CorpusSpec(source="stdlib", max_bytes=30_000).texts(), vocab_size=640)
    with pytest.raises(DataError, match="prepared with another tokenizer.*vocab_size"):
        get_shards(cfg.data, other, cache_dir=None)
    bare = shutil.copytree(
        remote, tmp_path / "bare", ignore=shutil.ignore_patterns("manifest.json")
    )
    cfg = tiny_run_config("data.corpus=null", f"data.mds.remote={bare}", f"data.mds.dir={cache}")
    with caplog.at_level("WARNING"):
        assert get_shards(cfg.data, other, cache_dir=None)[1] is None
    assert "no manifest.json could be fetched" in caplog.text
    assert not (cache / "manifest.json").exists()


def test_a_mixture_knows_its_longest_documents(first_run, tiny_run_config, tmp_path):
    """Each stream's manifest gives its document length; padded rows shorter than the
    longest are refused, as for one dataset. A stream without a manifest leaves the longest
    unknown (not the others' longest)."""
    from flexbert.data.mds import read_manifest
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.data import check_shard_length, get_shards

    root, _, first = first_run
    shards = first["data"]["mds_dir"]
    cfg = tiny_run_config("data.corpus=null", f"data.mds.streams={{a: {{dir: {shards}}}}}")
    _, manifest = get_shards(cfg.data, load_tokenizer(root / "run" / "tokenizer"), cache_dir=None)
    longest = read_manifest(shards)["settings"]["max_length"]
    assert manifest["settings"] == {"max_length": longest}
    cfg.data.seq_len = longest // 2
    with pytest.raises(ConfigError, match=f"up to {longest} tokens"):
        check_shard_length(cfg.data, "padded", manifest)
    bare = shutil.copytree(
        shards, tmp_path / "bare", ignore=shutil.ignore_patterns("manifest.json")
    )
    streams = f"{{a: {{dir: {shards}}}, b: {{dir: {tmp_path / 'cache'}, remote: {bare}}}}}"
    cfg = tiny_run_config("data.corpus=null", f"data.mds.streams={streams}")
    _, manifest = get_shards(cfg.data, load_tokenizer(root / "run" / "tokenizer"), cache_dir=None)
    assert "settings" not in manifest and manifest["counts"]["b"] is None


def test_a_tokenizer_saved_meanwhile_elsewhere_is_the_one_used(
    tiny_run_config, tmp_path, monkeypatch
):
    """Each node's local rank 0 trains the cached tokenizer onto a shared filesystem: the one
    saved first stays (its ranks may be loading it) and every process uses it."""
    import os

    from flexbert.train import data

    cfg, cache, train_tokenizer, seen = (
        tiny_run_config(),
        tmp_path / "cache",
        data.train_tokenizer,
        {},
    )

    def another_process_saves_first(*args, **kwargs):
        mine = train_tokenizer(*args, **kwargs)
        monkeypatch.setattr(data, "train_tokenizer", train_tokenizer)  # theirs trains normally
        theirs, path = data.get_tokenizer(cfg.data, cache)
        theirs.add_tokens(["<theirs>"])  # told apart from this process's copy
        theirs.save_pretrained(path)
        seen["path"], seen["file"] = path, os.stat(path / "tokenizer.json").st_ino
        return mine

    monkeypatch.setattr(data, "train_tokenizer", another_process_saves_first)
    tokenizer, path = data.get_tokenizer(cfg.data, cache)
    assert path == seen["path"] and os.stat(path / "tokenizer.json").st_ino == seen["file"]
    assert "<theirs>" in tokenizer.get_vocab()  # the saved one, not this process's
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp leftovers


def test_a_cached_tokenizer_directory_without_a_tokenizer_is_replaced(tiny_run_config, tmp_path):
    """An interrupted save leaves the cache directory without tokenizer.json: the next run
    trains again, puts its tokenizer there and leaves nothing else behind."""
    from flexbert.train import data

    cfg, cache = tiny_run_config(), tmp_path / "cache"
    _, path = data.get_tokenizer(cfg.data, cache)
    (path / "tokenizer.json").unlink()
    (path / "leftover.txt").write_text("half a save")
    tokenizer, again = data.get_tokenizer(cfg.data, cache)
    assert again == path and (path / "tokenizer.json").exists()
    assert not (path / "leftover.txt").exists()
    assert [p.name for p in cache.iterdir()] == [path.name]
    assert tokenizer.get_vocab() == data.load_tokenizer(path).get_vocab()


def test_a_tokenizer_finished_elsewhere_while_a_stale_directory_is_cleared_is_kept(
    tiny_run_config, tmp_path, monkeypatch
):
    """Two processes find the same interrupted save: the first clears it and saves its
    tokenizer; the second, moving the directory aside a moment later, finds that finished
    tokenizer in what it moved, puts it back and uses it (ranks may be loading it already)."""
    from pathlib import Path

    from flexbert.train import data

    cfg, cache = tiny_run_config(), tmp_path / "cache"
    theirs, path = data.get_tokenizer(cfg.data, cache)
    theirs.add_tokens(["<theirs>"])
    (path / "tokenizer.json").unlink()  # the interrupted save both processes find
    replace, moves = data.os.replace, []

    def the_other_process_finishes_first(src, dst):
        if Path(src) == path and not moves:  # just before this process moves it aside
            theirs.save_pretrained(path)
        moves.append((Path(src).name, Path(dst).name))
        return replace(src, dst)

    monkeypatch.setattr(data.os, "replace", the_other_process_finishes_first)
    tokenizer, again = data.get_tokenizer(cfg.data, cache)
    assert again == path and "<theirs>" in tokenizer.get_vocab()
    assert moves[1][1] == path.name  # put back before this process's own copy was tried
    assert [p.name for p in cache.iterdir()] == [path.name]  # no stale or temp leftovers
