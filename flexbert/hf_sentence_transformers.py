"""sentence-transformers directories: the module files that make a saved
FlexBertForSentenceEmbedding load in `SentenceTransformer(path)`, and reading such a directory's
encoder folder and pooling mode back (`flexbert.hf.load_hf`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flexbert.config import ModelConfig
from flexbert.registry import ConfigError

log = logging.getLogger(__name__)

# FlexBERT pooling -> the sentence-transformers Pooling mode that computes the same vector.
ST_POOLING_MODES = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens"}
ST_ALL_POOLING_MODES = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


def sentence_transformers_layout(path: Path) -> tuple[Path, str | None]:
    """(encoder folder, FlexBERT pooling) of a sentence-transformers directory, read from its
    modules.json and Pooling config (old `pooling_mode_*` flags or the newer `pooling_mode`);
    (path, None) for a plain model directory."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return path, None
    encoder, pooling = path, None
    from_st = {v: k for k, v in ST_POOLING_MODES.items()}
    for module in json.loads(modules_file.read_text()):
        kind, sub = module.get("type", ""), module.get("path", "")
        if kind.endswith(".Transformer"):
            encoder = path / sub
        elif kind.endswith(".Pooling"):
            settings = json.loads((path / sub / "config.json").read_text())
            if "pooling_mode" in settings:  # sentence-transformers >= 6: a name or a list
                mode = settings["pooling_mode"]
                modes = [mode] if isinstance(mode, str) else list(mode)
            else:  # no flag set: sentence-transformers pools by mean
                modes = [from_st.get(m, m) for m in ST_ALL_POOLING_MODES if settings.get(m)]
                modes = modes or ["mean"]
            if len(modes) != 1 or modes[0] not in ST_POOLING_MODES:
                raise ConfigError(
                    f"{path}: sentence-transformers pooling {settings} has no FlexBERT "
                    f"counterpart; FlexBERT pools with {sorted(ST_POOLING_MODES)}"
                )
            pooling = modes[0]
    return encoder, pooling


# Modules a sentence-embedding model may have after its encoder: pooling and normalisation.
ST_EMBEDDING_MODULES = (".Transformer", ".Pooling", ".Normalize")


def check_sentence_transformers_modules(path: Path) -> None:
    """A sentence-transformers directory whose vectors FlexBertForSentenceEmbedding computes:
    an encoder, a Pooling, a Normalize; anything else (a Dense projection...) is refused.
    Without a Normalize module its vectors are not unit length while FlexBERT's are: cosine
    scores agree, dot products do not (a warning says so)."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return
    kinds = [m.get("type", "") for m in json.loads(modules_file.read_text())]
    others = [k for k in kinds if not k.endswith(ST_EMBEDDING_MODULES)]
    if others:
        raise ConfigError(
            f"{path}: sentence-transformers modules {others} have no FlexBERT counterpart; "
            "FlexBertForSentenceEmbedding computes encoder -> Pooling -> Normalize (its encoder "
            "alone loads into FlexBertModel)"
        )
    if not any(k.endswith(".Normalize") for k in kinds):
        log.warning(
            "%s has no Normalize module: FlexBertForSentenceEmbedding's vectors are unit "
            "length, sentence-transformers' are not (cosine similarities agree, dot products "
            "differ)",
            path,
        )


def sentence_transformers_pooling(cfg: ModelConfig) -> str:
    """The sentence-transformers Pooling mode for the config's pooling, or a ConfigError."""
    mode = ST_POOLING_MODES.get(cfg.pooling.name)
    if mode is None:
        raise ConfigError(
            f"pooling {cfg.pooling.name!r} has no sentence-transformers counterpart; "
            f"use one of {sorted(ST_POOLING_MODES)}"
        )
    return mode


def write_sentence_transformers_modules(path: str | Path, cfg: ModelConfig) -> Path:
    """Beside a saved ModernBertModel, the module files that make `SentenceTransformer(path)`
    compute FlexBertForSentenceEmbedding's vectors: encoder -> Pooling -> Normalize."""
    mode = sentence_transformers_pooling(cfg)
    path = Path(path)
    modules = [
        ("", "sentence_transformers.models.Transformer"),
        ("1_Pooling", "sentence_transformers.models.Pooling"),
        ("2_Normalize", "sentence_transformers.models.Normalize"),
    ]
    files = {
        "modules.json": [
            {"idx": i, "name": str(i), "path": sub, "type": kind}
            for i, (sub, kind) in enumerate(modules)
        ],
        "sentence_bert_config.json": {"max_seq_length": cfg.max_seq_len, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "similarity_fn_name": "cosine",
            "prompts": {},
            "default_prompt_name": None,
        },
        "1_Pooling/config.json": {
            "word_embedding_dimension": cfg.hidden_size,
            **{m: m == mode for m in ST_ALL_POOLING_MODES},
            "include_prompt": True,
        },
    }
    (path / "2_Normalize").mkdir(parents=True, exist_ok=True)  # Normalize has no settings
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    return path
