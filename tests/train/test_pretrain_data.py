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
    check_shard_length(data, "padded", None)  # a mixture: no single manifest
