"""A saved FlexBertForColBERT as a PyLate model: the module files that PyLate
(`pylate.models.ColBERT(path)`) and sentence-transformers (`MultiVectorEncoder(path)`, which
reads PyLate's layout) load beside the encoder that `save_hf` wrote, so that they encode and
score exactly as FlexBERT does (the PyLate layout of its 3.x saves: the encoder, then a
bias-free Dense projection in `1_Dense/`, and the ColBERT settings in
config_sentence_transformers.json).

The settings map one to one: the marker ids become PyLate's `query_prefix` /
`document_prefix` tokens (inserted after [CLS], as FlexBERT does), the skiplist ids its
`skiplist_words`, `query_length` its query length (queries padded with [MASK], attended or
not: `attend_to_expansion_tokens`), and the length documents were cut to in training its
`document_length` (the marker counted in both)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexbert.colbert import FlexBertForColBERT
from flexbert.colbert_settings import check_positive_int
from flexbert.registry import ConfigError

PYLATE_DENSE_DIR = "1_Dense"
PYLATE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def pylate_settings(model: FlexBertForColBERT, tokenizer: Any, document_length: int) -> dict:
    """config_sentence_transformers.json of the PyLate model that scores like `model`."""
    check_positive_int("document_length", document_length)
    least = 2 + (model.document_marker_id is not None)  # [CLS], the marker, one token
    if not least <= document_length <= model.config.max_seq_len:
        raise ConfigError(
            f"document_length: between {least} and max_seq_len={model.config.max_seq_len} "
            f"(the marker counted), got {document_length}"
        )

    def token(token_id: int | None) -> str:
        if token_id is None:
            return ""  # PyLate's "no prefix"
        (text,) = tokenizer.convert_ids_to_tokens([token_id])
        if text is None or tokenizer.convert_tokens_to_ids(text) != token_id:
            raise ConfigError(
                f"token id {token_id} (a ColBERT marker) is not a token of the tokenizer; "
                "save with the tokenizer the model was trained with"
            )
        return text

    skip = model.skiplist_ids or []
    words = tokenizer.convert_ids_to_tokens(skip)
    if any(w is None or tokenizer.convert_tokens_to_ids(w) != i for w, i in zip(words, skip)):
        raise ConfigError(
            f"skiplist ids {skip} are not all tokens of the tokenizer; save with the tokenizer "
            "the model was trained with"
        )
    return {
        "model_type": "ColBERT",
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "MaxSim",
        "query_prefix": token(model.query_marker_id),
        "document_prefix": token(model.document_marker_id),
        "query_length": model.query_length,
        "document_length": document_length,
        "attend_to_expansion_tokens": model.attend_to_expansion_tokens,
        "skiplist_words": words,
        "do_query_expansion": True,
    }


def write_pylate_modules(
    path: str | Path, model: FlexBertForColBERT, tokenizer: Any, document_length: int
) -> Path:
    """Beside the encoder that `model.save_hf(path)` wrote (and the tokenizer), the files
    that make `path` a PyLate ColBERT model scoring as `model` does; `document_length`: the
    length documents are cut to, their marker counted (training's task.doc_max_len)."""
    from safetensors.torch import save_file

    path = Path(path)
    settings = pylate_settings(model, tokenizer, document_length)
    dense = path / PYLATE_DENSE_DIR
    dense.mkdir(parents=True, exist_ok=True)
    weight = model.projection.weight.detach().contiguous().cpu()
    save_file(
        {"linear.weight": weight}, str(dense / "model.safetensors"), metadata={"format": "pt"}
    )
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": PYLATE_DENSE_DIR, "type": "pylate.models.Dense.Dense"},
        ],
        "sentence_bert_config.json": {"max_seq_length": document_length, "do_lower_case": False},
        "config_sentence_transformers.json": settings,
        f"{PYLATE_DENSE_DIR}/config.json": {
            "in_features": model.config.hidden_size,
            "out_features": model.colbert_dim,
            "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity",
            "use_residual": False,
        },
    }
    for name, content in files.items():
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    return path
