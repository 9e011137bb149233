import json

from flexbert.data.cli import main
from flexbert.data.mds import read_manifest


def test_tokenizer_then_prepare(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(
        "".join(
            json.dumps({"text": f"document number {i} about packing and masking."}) + "\n"
            for i in range(40)
        )
    )
    assert (
        main(
            [
                "tokenizer",
                str(tmp_path / "tok"),
                "--corpus",
                str(corpus),
                "--vocab-size",
                "320",
                "--num-unused",
                "2",
                "--min-frequency",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    before = (tmp_path / "tok" / "tokenizer.json").read_text()
    again = ["tokenizer", str(tmp_path / "tok"), "--corpus", str(corpus), "--vocab-size", "384"]
    assert main(again) == 2  # a tokenizer that shards and runs refer to is not replaced
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == before
    args = [
        "prepare",
        str(tmp_path / "mds"),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--corpus",
        str(corpus),
        "--max-length",
        "16",
        "--val-fraction",
        "0.25",
        "--no-progress",
    ]
    assert main(args) == 0
    counts = read_manifest(tmp_path / "mds")["counts"]
    assert counts["total"]["documents"] == 40
    assert counts["val"]["documents"] > 0
    assert main(args) == 0
    assert "already up to date" in capsys.readouterr().out


def test_errors_exit_with_message(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "mds"), "--tokenizer", str(tmp_path / "no-tok")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer not found" in err and "no-tok" in err
    assert not (tmp_path / "mds").exists()
    (tmp_path / "corpus").mkdir()  # a folder, but not a tokenizer's
    assert main(["prepare", str(tmp_path / "mds"), "--tokenizer", str(tmp_path / "corpus")]) == 2
    assert "is not a tokenizer directory" in capsys.readouterr().err


def test_inspect_reports_lengths_and_decodes_samples(mds_dir, tokenizer_dir, tmp_path, capsys):
    import shutil

    mds_dir = shutil.copytree(mds_dir, tmp_path / "shards")  # reading leaves decompressed files
    args = ["inspect", str(mds_dir), "--tokenizer", str(tokenizer_dir), "--samples", "2"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    manifest = read_manifest(mds_dir)
    assert report["counts"] == manifest["counts"]["train"]
    assert report["lengths"]["samples"] == manifest["counts"]["train"]["chunks"]
    assert report["lengths"]["length_max"] <= report["settings"]["max_length"] == 64
    first = report["samples"][0]
    assert first["first_ids"][0] == manifest["settings"]["cls_token_id"]
    assert len(report["samples"]) == 2 and first["text"].strip()


def test_inspect_of_a_missing_folder_names_it(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
