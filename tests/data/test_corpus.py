import json

import pytest

from flexbert.data.corpus import CorpusSpec, read_path, split_of
from flexbert.data.errors import DataError


def texts(path, **kw):
    return [d.text for d in read_path(path, **kw)]


def test_text_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("para one\nline two\n\n\npara two\n")
    assert texts(f, text_mode="file") == ["para one\nline two\n\n\npara two\n"]
    assert texts(f, text_mode="paragraph") == ["para one\nline two", "para two"]
    assert texts(f, text_mode="line") == ["para one", "line two", "", "", "para two"]
    with pytest.raises(DataError, match="text_mode"):
        texts(f, text_mode="sentence")


def test_jsonl_with_custom_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "x y"}) + "\n\n" + json.dumps({"body": "z"}) + "\n")
    docs = list(read_path(f, text_field="body"))
    assert [d.text for d in docs] == ["x y", "z"]
    assert [d.id for d in docs] == ["d.jsonl:1", "d.jsonl:3"]  # relative: machine-independent
    with pytest.raises(DataError, match=r"d.jsonl:1: missing text field 'text'"):
        texts(f)


def test_corrupt_jsonl_names_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        texts(f)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", None, "three"], "n": [1, 2, 3]}), f)
    assert texts(f) == ["one", "", "three"]
    with pytest.raises(DataError, match="missing text field 'content'"):
        texts(f, text_field="content")
    # a column that is not text is a clear error, as in JSONL (0 once became empty text)
    with pytest.raises(DataError, match=r"d.parquet row 0: field 'n' must be a string, got int"):
        texts(f, text_field="n")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet"):
        texts(bad)


def test_hf_dataset_on_disk(tmp_path):
    import datasets

    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}),
            "test": datasets.Dataset.from_dict({"text": ["c"]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    assert texts(tmp_path / "hf") == ["a", "b"]
    assert texts(tmp_path / "hf", hf_split="test") == ["c"]
    with pytest.raises(DataError, match="no split 'dev'"):
        texts(tmp_path / "hf", hf_split="dev")
    with pytest.raises(DataError, match="row 0: field 'label' must be a string, got int"):
        texts(tmp_path / "hf", text_field="label")


def test_directory_is_recursive_sorted_and_mixed(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from z")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n")
    (tmp_path / "b" / "c.txt").write_text("from c")
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    assert texts(tmp_path) == ["from a", "from c", "from z"]


def _compress(path, suffix):
    """`path` compressed into `path` + suffix (the original removed)."""
    import bz2
    import gzip
    import lzma

    import zstandard

    packers = {
        ".gz": gzip.compress,
        ".bz2": bz2.compress,
        ".xz": lzma.compress,
        ".zst": zstandard.ZstdCompressor().compress,
    }
    out = path.with_name(path.name + suffix)
    out.write_bytes(packers[suffix](path.read_bytes()))
    path.unlink()
    return out


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_text_and_jsonl_read_as_the_plain_files(tmp_path, suffix):
    rows = [{"text": f"document {i} " + "word " * 50} for i in range(200)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = tmp_path / "t.txt"
    text.write_text("para one\n\npara two\n")
    plain = texts(tmp_path)
    for f in (jsonl, text):
        _compress(f, suffix)
    docs = list(read_path(tmp_path))
    assert [d.text for d in docs] == plain  # same documents, a folder of compressed files
    assert docs[0].id == f"{tmp_path.name}/d.jsonl{suffix}:1"
    truncated = tmp_path / f"d.jsonl{suffix}"
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 2])
    with pytest.raises(DataError, match=f"d.jsonl{suffix}: cannot read"):
        texts(truncated)
    truncated.write_bytes(b"not compressed at all")
    with pytest.raises(DataError, match=f"d.jsonl{suffix}: cannot read"):
        texts(truncated)


def test_a_zst_file_of_several_frames_reads_whole(tmp_path):
    """Parallel compressors write one zstd frame per block: every frame is read."""
    import zstandard

    parts = [
        "".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(3000)) for name in "ab"
    ]
    packer = zstandard.ZstdCompressor()
    f = tmp_path / "two.jsonl.zst"
    f.write_bytes(b"".join(packer.compress(part.encode()) for part in parts))
    assert texts(f) == [f"{name} {i}" for name in "ab" for i in range(3000)]


def test_a_folder_says_which_files_it_skips(tmp_path, caplog):
    """A dataset folder whose data files have an unread suffix must not shrink to its card
    without a word: the skipped files are named."""
    (tmp_path / "README.md").write_text("# My dataset card")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-0000.arrow").write_bytes(b"\0\1")
    (tmp_path / "data" / "train-0001.parquet.gz").write_bytes(b"\0\1")  # only text/JSONL
    with caplog.at_level("WARNING"):
        assert texts(tmp_path) == ["# My dataset card"]
    assert "2 files are not corpus files and are skipped" in caplog.text
    assert "data/train-0000.arrow, data/train-0001.parquet.gz" in caplog.text


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        texts(tmp_path / "missing.txt")


def test_split_is_deterministic_and_near_fraction():
    ids = [f"doc-{i}" for i in range(4000)]
    splits = [split_of(i, 0.1) for i in ids]
    assert splits == [split_of(i, 0.1) for i in ids]
    assert 0.08 < splits.count("val") / len(ids) < 0.12
    assert splits != [split_of(i, 0.1, seed=1) for i in ids]


def test_stdlib_corpus_is_real_deterministic_and_capped():
    spec = CorpusSpec(source="stdlib", max_bytes=200_000)
    docs = list(spec.documents())
    assert [d.id for d in docs] == [d.id for d in spec.documents()]
    kinds = {d.id.split(":")[0] for d in docs}
    assert kinds == {"stdlib", "stdlib-doc", "pydoc"}
    total = sum(len(d.text.encode()) for d in docs)
    assert 200_000 <= total < 200_000 + max(len(d.text.encode()) for d in docs)
    assert any("def " in d.text for d in docs) and any(" the " in d.text for d in docs)
    assert len(list(CorpusSpec(source="stdlib", max_documents=5).documents())) == 5


def test_stdlib_corpus_is_tens_of_megabytes():
    from flexbert.data.stdlib_corpus import _module_files, stdlib_root

    root = stdlib_root()
    assert sum(f.stat().st_size for f in _module_files(root)) > 10_000_000
