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
