"""Byte-level BPE tokenizer training, loading and model/tokenizer consistency checks.

The trained tokenizer is saved as a plain Hugging Face directory (tokenizer.json plus configs)
so `transformers.AutoTokenizer.from_pretrained(dir)` loads it, and a ModernBERT-style model can
be exported next to it. Special tokens come first so their ids are small and stable:
[PAD]=0, [CLS]=1, [SEP]=2, [MASK]=3, [UNK]=4 (the `tiny` model preset uses the same ids).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from flexbert.data.errors import DataError, DataFileNotFoundError

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "unk_token": "[UNK]",
}
REQUIRED_SPECIALS = ("pad_token", "cls_token", "sep_token", "mask_token")
VOCAB_MULTIPLE = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 50368,
    num_unused: int = 83,
    min_frequency: int = 2,
    model_max_length: int = 8192,
) -> Any:
    """Train a byte-level BPE tokenizer on `texts` and return a PreTrainedTokenizerFast.

    BPE learns up to `vocab_size - num_unused` tokens (specials included); then [unusedN]
    tokens are added until the size is a multiple of 64 with at least `num_unused` of them,
    which keeps the embedding matrix tensor-core friendly and leaves room for later tokens.
    """
    smallest = 256 + len(SPECIAL_TOKENS) + num_unused  # the byte alphabet, specials, reserved
    if vocab_size < smallest:
        raise DataError(f"vocab_size={vocab_size} is too small: byte-level BPE needs >= {smallest}")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_unused,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    final = _round_up(tok.get_vocab_size() + num_unused, VOCAB_MULTIPLE)
    n_unused = final - tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(f"[unused{i}]", special=True) for i in range(n_unused)])
    ids = {name: tok.token_to_id(t) for name, t in SPECIAL_TOKENS.items()}
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["cls_token"]), ("[SEP]", ids["sep_token"])],
    )
    return wrap_tokenizer(tok, model_max_length=model_max_length)


def wrap_tokenizer(tok: Tokenizer, model_max_length: int = 8192) -> Any:
    """Wrap a `tokenizers.Tokenizer` as a transformers PreTrainedTokenizerFast with BERT specials."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS
    )


def save_tokenizer(
    tokenizer: Any, out_dir: str | Path, model_max_length: int | None = None
) -> Path:
    """Save so that AutoTokenizer / PreTrainedTokenizerFast load the directory offline.
    Beside a model, `model_max_length` is the model's length (`config.max_seq_len`), so that
    `truncation=True` cuts inputs to what the model takes, not to the tokenizer's own limit."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg.update(specials)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if model_max_length is not None:
        cfg["model_max_length"] = int(model_max_length)
    cfg.setdefault("model_max_length", int(tokenizer.model_max_length))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out


# What a Hugging Face tokenizer directory holds (one of them at least).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def load_tokenizer(path: str | Path, require_specials: bool = True) -> Any:
    """Load a local Hugging Face tokenizer directory (or tokenizer.json) without any network.

    With `require_specials`, a tokenizer lacking [PAD]/[CLS]/[SEP]/[MASK]-style tokens is refused
    here, before it silently produces unmaskable or unpackable data.
    """
    p = Path(path)
    if not p.exists():
        raise DataFileNotFoundError(
            f"tokenizer not found: {p} (expected a directory with tokenizer.json)"
        )
    if p.is_dir() and not any((p / f).exists() for f in TOKENIZER_FILES):
        raise DataError(
            f"{p} is not a tokenizer directory (none of {list(TOKENIZER_FILES)} in it): pass "
            "the folder `flexbert-data tokenizer` or save_pretrained wrote"
        )
    try:
        if p.is_file():
            tokenizer = wrap_tokenizer(Tokenizer.from_file(str(p)))
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - many libraries, one clear message
        raise DataError(f"could not load tokenizer from {p}: {e}") from e
    if require_specials:
        check_special_tokens(tokenizer, source=str(p))
    return tokenizer


def check_special_tokens(tokenizer: Any, source: str = "tokenizer") -> None:
    """Raise DataError when a special token needed for MLM (pad, cls, sep, mask) is missing."""
    missing = [n for n in REQUIRED_SPECIALS if getattr(tokenizer, f"{n}_id", None) is None]
    if missing:
        raise DataError(
            f"{source} lacks special tokens {missing}; MLM needs pad, cls, sep and mask "
            f"(e.g. {[SPECIAL_TOKENS[n] for n in missing]})"
        )


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The model fields a tokenizer determines: vocab_size and the four special ids."""
    check_special_tokens(tokenizer)
    return {
        "vocab_size": _round_up(len(tokenizer), VOCAB_MULTIPLE),
        "pad_token_id": int(tokenizer.pad_token_id),
        "cls_token_id": int(tokenizer.cls_token_id),
        "sep_token_id": int(tokenizer.sep_token_id),
        "mask_token_id": int(tokenizer.mask_token_id),
    }


def check_tokenizer_matches(
    tokenizer: Any,
    *,
    vocab_size: int,
    pad_token_id: int,
    cls_token_id: int,
    sep_token_id: int,
    mask_token_id: int,
) -> None:
    """Refuse a model/tokenizer pair that would train on wrong ids; the message lists each diff."""
    check_special_tokens(tokenizer)
    problems = []
    if len(tokenizer) > vocab_size:
        problems.append(f"tokenizer has {len(tokenizer)} tokens but model vocab_size={vocab_size}")
    expected = {
        "pad_token_id": pad_token_id,
        "cls_token_id": cls_token_id,
        "sep_token_id": sep_token_id,
        "mask_token_id": mask_token_id,
    }
    for name, model_id in expected.items():
        tok_id = getattr(tokenizer, name)
        if tok_id != model_id:
            problems.append(f"{name}: model {model_id}, tokenizer {tok_id}")
    if problems:
        raise DataError("model and tokenizer do not match: " + "; ".join(problems))


def protected_token_ids(tokenizer: Any) -> set[int]:
    """Ids MLM never masks nor predicts: the special tokens and every added token marked
    special ([unused] slots among them). Added tokens that are ordinary text (e.g. runs of
    spaces, `special=False`) are vocabulary like any other."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def allowed_token_ids(tokenizer: Any) -> list[int]:
    """Ids of real vocabulary tokens: everything except `protected_token_ids`.

    MLM random replacements are drawn from this set so a model never learns to predict
    padding or reserved slots.
    """
    excluded = protected_token_ids(tokenizer)
    return sorted(i for i in tokenizer.get_vocab().values() if i not in excluded)
