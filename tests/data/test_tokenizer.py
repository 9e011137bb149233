import json

import pytest

from flexbert.data.errors import DataError
from flexbert.data.tokenizer import (
    allowed_token_ids,
    check_tokenizer_matches,
    load_tokenizer,
    special_token_ids,
)


def test_vocab_is_multiple_of_64_with_reserved_unused(tokenizer):
    assert len(tokenizer) % 64 == 0
    vocab = tokenizer.get_vocab()
    unused = [t for t in vocab if t.startswith("[unused")]
    assert len(unused) >= 4
    assert len(allowed_token_ids(tokenizer)) == len(tokenizer) - len(unused) - 5


def test_saved_dir_loads_with_auto_tokenizer_and_round_trips(tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (
        json.loads((tokenizer_dir / "special_tokens_map.json").read_text())["mask_token"]
        == "[MASK]"
    )
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert isinstance(
        PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir)), PreTrainedTokenizerFast
    )
    text = "def f(x):\n    return x + 1  # The quick brown fox, héllo wörld."
    ids = hf(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"]
    assert ids[0] == hf.cls_token_id and ids[-1] == hf.sep_token_id
    assert hf.decode(ids, skip_special_tokens=True) == text
    assert special_token_ids(hf) == special_token_ids(tokenizer)
    assert {hf.pad_token, hf.cls_token, hf.sep_token, hf.mask_token, hf.unk_token} == {
        "[PAD]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "[UNK]",
    }


def test_pair_template(tokenizer):
    a = tokenizer("first part", add_special_tokens=False)["input_ids"]
    b = tokenizer("second part", add_special_tokens=False)["input_ids"]
    pair = tokenizer("first part", "second part")["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert pair == [cls, *a, sep, *b, sep]


def test_mask_token_is_one_id(tokenizer):
    ids = tokenizer("a [MASK] b", add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.mask_token_id) == 1


def test_check_tokenizer_matches(tokenizer):
    ids = special_token_ids(tokenizer)
    check_tokenizer_matches(tokenizer, **ids)
    check_tokenizer_matches(tokenizer, **{**ids, "vocab_size": ids["vocab_size"] + 64})
    with pytest.raises(DataError, match="mask_token_id: model 7, tokenizer 3"):
        check_tokenizer_matches(tokenizer, **{**ids, "mask_token_id": 7})
    with pytest.raises(DataError, match="vocab_size=64"):
        check_tokenizer_matches(tokenizer, **{**ids, "vocab_size": 64})


def test_tokenizer_without_mask_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(
        models.WordLevel({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3}, unk_token="[PAD]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    hf.save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(DataError, match="mask_token"):
        load_tokenizer(tmp_path / "tok")


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
