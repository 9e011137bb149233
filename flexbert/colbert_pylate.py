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
`document_length` (the marker counted in both).

`read_pylate_head` reads them back from a PyLate model (its 3.x layout, as PyLate trains and
the Hub holds them) or a sentence-transformers `MultiVectorEncoder` save (its own layout:
prompts for the markers, `query_expansion`, a `MultiVectorMask` with the skiplist, a
`Normalize`), so `FlexBertForColBERT.from_pretrained` scores as they do. What FlexBERT's head
cannot compute (a projection with a bias or an activation, more modules, text prompts, no
query expansion) is refused by name."""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flexbert.colbert_settings import check_positive_int
from flexbert.registry import ConfigError

if TYPE_CHECKING:
    from flexbert.colbert import FlexBertForColBERT

log = logging.getLogger(__name__)

PYLATE_DENSE_DIR = "1_Dense"
PYLATE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# config_sentence_transformers.json's model_type of a PyLate 3.x save / a MultiVectorEncoder's
MULTI_VECTOR_MODEL_TYPES = ("ColBERT", "MultiVectorEncoder")
IDENTITY = "torch.nn.modules.linear.Identity"


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


# ------------------------------------------------------------------ reading one back
def read_pylate_head(folder: Path) -> dict[str, Any] | None:
    """The ColBERT head of a PyLate (3.x layout) or sentence-transformers MultiVectorEncoder
    directory: {"settings": FlexBertForColBERT's settings, "weight": the (colbert_dim, hidden)
    projection}, scoring as PyLate / sentence-transformers do; None for any other directory.
    The marker and skiplist tokens become ids through the directory's tokenizer."""
    modules_file = folder / "modules.json"
    st_file = folder / "config_sentence_transformers.json"
    if not (modules_file.exists() and st_file.exists()):
        return None
    st_config = json.loads(st_file.read_text())
    model_type = st_config.get("model_type")
    if model_type not in MULTI_VECTOR_MODEL_TYPES:
        return None  # a single-vector sentence-transformers model: its encoder alone
    modules = {kind: folder / sub for kind, sub in module_kinds(folder, modules_file).items()}
    tokenizer = load_head_tokenizer(modules["Transformer"])
    if model_type == "ColBERT":
        settings = pylate_v3_settings(folder, st_config, tokenizer)
    else:
        settings = multi_vector_encoder_settings(folder, st_config, modules, tokenizer)
    warn_what_flexbert_leaves_to_the_caller(folder, st_config, modules["Transformer"])
    weight = read_dense(modules["Dense"])
    settings["colbert_dim"] = int(weight.shape[0])
    return {"settings": settings, "weight": weight}


def warn_what_flexbert_leaves_to_the_caller(
    folder: Path, st_config: dict[str, Any], encoder_dir: Path
) -> None:
    """Settings that change the texts or the scale of the scores, not the ranking by MaxSim:
    FlexBertForColBERT takes token ids and returns MaxSim, so these are the caller's."""
    similarity = str(st_config.get("similarity_fn_name") or "maxsim").lower()
    if similarity != "maxsim":
        log.warning(
            "%s scores by %s; FlexBertForColBERT.score returns MaxSim (meanmaxsim divides it by "
            "the query's token count)",
            folder,
            similarity,
        )
    transformer_file = encoder_dir / "sentence_bert_config.json"
    transformer = json.loads(transformer_file.read_text()) if transformer_file.exists() else {}
    if transformer.get("do_lower_case"):
        log.warning("%s lowercases its texts: lowercase them before tokenizing", folder)


# The modules after the encoder that FlexBertForColBERT computes, in this order; the mask
# and normalisation are a MultiVectorEncoder's (PyLate 3.x applies both inline).
HEAD_MODULES = ("Transformer", "Dense", "MultiVectorMask", "Normalize")


def module_kinds(folder: Path, modules_file: Path) -> dict[str, str]:
    """{kind: subfolder} of the modules listed in modules.json, which must be the encoder,
    one Dense, and (a MultiVectorEncoder's) a MultiVectorMask and a Normalize, in that order."""
    listed = [
        (m.get("type", "").rsplit(".", 1)[-1], m.get("path", ""))
        for m in json.loads(modules_file.read_text())
    ]
    kinds = [kind for kind, _ in listed]
    if (
        kinds[:2] != ["Transformer", "Dense"]
        or any(kinds.count(k) > 1 or k not in HEAD_MODULES for k in kinds)
        or kinds != sorted(kinds, key=HEAD_MODULES.index)
    ):
        raise ConfigError(
            f"{folder}: modules {kinds} have no FlexBERT counterpart; FlexBertForColBERT "
            "computes Transformer -> one Dense projection (-> MultiVectorMask -> Normalize)"
        )
    return dict(listed)


def load_head_tokenizer(encoder_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(encoder_dir), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - many causes, one clear message
        raise FileNotFoundError(
            f"{encoder_dir}: the tokenizer of this ColBERT model could not be loaded (it names "
            f"the marker and skiplist tokens): {type(err).__name__}: {err}"
        ) from None


def read_dense(dense_dir: Path) -> torch.Tensor:
    """The weight of a bias-free, activation-free Dense (PyLate's or sentence-transformers')."""
    config = json.loads((dense_dir / "config.json").read_text())
    activation = config.get("activation_function") or IDENTITY
    if config.get("bias") or activation != IDENTITY or config.get("use_residual"):
        raise ConfigError(
            f"{dense_dir}: a Dense with bias={config.get('bias')}, activation {activation}, "
            f"use_residual={config.get('use_residual')}; FlexBERT's ColBERT projection is "
            "one bias-free linear map (bias false, Identity, no residual)"
        )
    if (dense_dir / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(dense_dir / "model.safetensors"))
    elif (dense_dir / "pytorch_model.bin").exists():  # older saves
        state = torch.load(dense_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"{dense_dir}: neither model.safetensors nor pytorch_model.bin (the projection's "
            "weights); copy the whole model directory"
        )
    if "linear.weight" not in state:
        raise ConfigError(f"{dense_dir}: no 'linear.weight' among {sorted(state)}")
    return state["linear.weight"].float()


def pylate_v3_settings(folder: Path, config: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """PyLate 3.x's top-level settings (with PyLate's defaults where a key is missing)."""
    if config.get("do_query_expansion") is False:
        raise ConfigError(
            f"{folder}: do_query_expansion is false; FlexBERT's ColBERT always pads queries "
            "to query_length with [MASK]"
        )
    prompts = {k: v for k, v in (config.get("prompts") or {}).items() if v}
    if prompts:
        raise ConfigError(
            f"{folder}: text prompts {prompts} have no FlexBERT counterpart (its markers are "
            "the single tokens query_prefix / document_prefix)"
        )
    words = config.get("skiplist_words")
    return {
        "query_length": config.get("query_length") or 32,  # as PyLate
        "query_marker_id": marker_id(folder, "query_prefix", config.get("query_prefix"), tokenizer),
        "document_marker_id": marker_id(
            folder, "document_prefix", config.get("document_prefix"), tokenizer
        ),
        "attend_to_expansion_tokens": bool(config.get("attend_to_expansion_tokens", False)),
        "skiplist_ids": word_ids(list(string.punctuation) if words is None else words, tokenizer),
    }


def multi_vector_encoder_settings(
    folder: Path, config: dict[str, Any], modules: dict[str, Path], tokenizer: Any
) -> dict[str, Any]:
    """A MultiVectorEncoder's settings: the prompts (single tokens) as markers, the
    Transformer's fixed [MASK] query expansion, the MultiVectorMask's document skiplist."""
    for kind, why in (
        ("Normalize", "FlexBERT's ColBERT vectors are L2-normalised"),
        ("MultiVectorMask", "without it sentence-transformers leaves unattended [MASK]s unscored"),
    ):
        if kind not in modules:
            raise ConfigError(f"{folder}: no {kind} module; {why}")
    transformer = json.loads((modules["Transformer"] / "sentence_bert_config.json").read_text())
    expansion = transformer.get("query_expansion")
    if (
        not isinstance(expansion, dict)
        or expansion.get("strategy") != "fixed"
        or (expansion.get("token") not in (None, tokenizer.mask_token))
        or not isinstance(expansion.get("length"), int)
    ):
        raise ConfigError(
            f"{folder}: query_expansion {expansion}; FlexBERT's ColBERT pads queries to a fixed "
            "length with [MASK] (strategy 'fixed', token null, a length)"
        )
    prompts = config.get("prompts") or {}
    settings = {
        "query_length": expansion["length"],
        "query_marker_id": prompt_marker_id(folder, "query", prompts.get("query"), tokenizer),
        "document_marker_id": prompt_marker_id(
            folder, "document", prompts.get("document"), tokenizer
        ),
        "attend_to_expansion_tokens": bool(expansion.get("attend", False)),
    }
    mask = json.loads((modules["MultiVectorMask"] / "config.json").read_text())
    tasks = mask.get("skiplist_tasks")
    tasks = ["document"] if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    words = (mask.get("skiplist_words") or []) if "document" in tasks else []  # [] skips none
    if (words and tasks != ["document"]) or mask.get("keep_only_token_ids"):
        raise ConfigError(
            f"{folder}: MultiVectorMask {mask}; FlexBERT's skiplist applies to documents "
            "alone (skiplist_tasks ['document'] or [], keep_only_token_ids null)"
        )
    return {**settings, "skiplist_ids": word_ids(words, tokenizer)}


def marker_id(folder: Path, key: str, token: str | None, tokenizer: Any) -> int | None:
    """The id of a marker token ([Q] / [D]); None for no marker ("" or null)."""
    if not token:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ConfigError(
            f"{folder}: {key} {token!r} is not one token of its tokenizer; FlexBERT's ColBERT "
            "markers are single tokens inserted after [CLS]"
        )
    return int(token_id)


def prompt_marker_id(folder: Path, task: str, prompt: str | None, tokenizer: Any) -> int | None:
    """A MultiVectorEncoder prepends its prompt as text: the marker it equals must be one
    token that the tokenizer keeps whole (a special token), else it is a text prompt."""
    if prompt and tokenizer.tokenize(prompt) != [prompt]:
        raise ConfigError(
            f"{folder}: the {task} prompt {prompt!r} is text (tokenized as "
            f"{tokenizer.tokenize(prompt)}); FlexBERT's ColBERT markers are single tokens "
            "inserted after [CLS]"
        )
    return marker_id(folder, f"prompts.{task}", prompt, tokenizer)


def word_ids(words: list[str], tokenizer: Any) -> list[int] | None:
    """Skiplist words -> token ids; words that are no token of the tokenizer are dropped,
    as sentence-transformers drops them (a warning names them)."""
    ids, unknown = [], []
    for word in words:
        token_id = tokenizer.convert_tokens_to_ids(word)
        if token_id is None or (token_id == tokenizer.unk_token_id and word != tokenizer.unk_token):
            unknown.append(word)
        else:
            ids.append(int(token_id))
    if unknown:
        log.warning("skiplist words %s are not tokens of the tokenizer: dropped", unknown)
    return sorted(set(ids)) or None
