"""Conversion to and from Hugging Face ModernBERT checkpoints.

FlexBERT names its modules like transformers' ModernBERT (`model.layers.3.attn.Wqkv`, ...), so
the weights map one to one; this file maps the configs, reads and writes the files and refuses
what the other side cannot express. transformers is imported inside the functions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from flexbert.config import ModelConfig
from flexbert.hf_sentence_transformers import (
    check_sentence_transformers_modules,
    sentence_transformers_layout,
)
from flexbert.registry import ConfigError

log = logging.getLogger(__name__)

# FlexBERT activation name <-> transformers ACT2FN name.
ACT_TO_HF = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "silu": "silu",
    "relu": "relu",
    "relu2": "relu2",
}
# transformers' other names for the same functions (its pure-Python forms included).
ACT_FROM_HF = {
    **{v: k for k, v in ACT_TO_HF.items()},
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "swish": "silu",
}
HEAD_ARCHITECTURES = {
    "FlexBertModel": "ModernBertModel",
    "FlexBertForMaskedLM": "ModernBertForMaskedLM",
    "FlexBertForSequenceClassification": "ModernBertForSequenceClassification",
    "FlexBertForTokenClassification": "ModernBertForTokenClassification",
    "FlexBertForMultipleChoice": "ModernBertForMultipleChoice",
    "FlexBertForQuestionAnswering": "ModernBertForQuestionAnswering",
}
# Keys a head may lack in a checkpoint of another head (a fresh classifier for fine-tuning),
# and keys a checkpoint may hold that this model does not use (the MLM decoder, or a
# prediction head when loading into a model without one, such as sentence embeddings).
# A task model's own layers that may start fresh (the source has none: an encoder-only or
# embedding model under a classifier), and a source's layers that a target without them drops.
NEW_HEAD_PREFIXES = ("classifier.", "head.", "decoder.")
DROPPABLE_PREFIXES = ("decoder.", "classifier.", "head.", "projection.", "_extra_state")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------- config
def config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    """transformers ModernBertConfig -> ModelConfig (overrides win)."""
    act = _act_from_hf(hf_config.hidden_activation, "hidden_activation")
    head_act = _act_from_hf(hf_config.classifier_activation, "classifier_activation")
    types = ["global" if t == "full_attention" else "local" for t in hf_config.layer_types]
    rope = hf_config.rope_parameters
    for kind in ("full_attention", "sliding_attention"):
        rope_type = (rope.get(kind) or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(
                f"rope_parameters[{kind}] uses rope_type '{rope_type}'; only 'default' is supported"
            )
    values = dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        pad_token_id=hf_config.pad_token_id,
        cls_token_id=hf_config.cls_token_id,
        sep_token_id=hf_config.sep_token_id,
        norm={"name": "layernorm", "eps": hf_config.norm_eps, "bias": hf_config.norm_bias},
        activation=act,
        head_activation=head_act,
        mlp="glu",
        # ModernBERT attends |i - j| <= local_attention // 2: an odd window is the even below
        attention_pattern=_pattern_from_types(types, hf_config.local_attention // 2 * 2),
        position={
            "name": "rope",
            "global_theta": float(rope["full_attention"]["rope_theta"]),
            "local_theta": float(rope["sliding_attention"]["rope_theta"]),
        },
        pooling=hf_config.classifier_pooling,
        qkv_bias=hf_config.attention_bias,
        attn_out_bias=hf_config.attention_bias,
        mlp_in_bias=hf_config.mlp_bias,
        mlp_out_bias=hf_config.mlp_bias,
        head_bias=hf_config.classifier_bias,
        decoder_bias=hf_config.decoder_bias,
        embedding_dropout=float(hf_config.embedding_dropout),
        attention_dropout=float(hf_config.attention_dropout),
        mlp_dropout=float(hf_config.mlp_dropout),
        head_dropout=float(hf_config.classifier_dropout),
        sparse_prediction=hf_config.sparse_prediction,
        num_labels=hf_config.num_labels,
        problem_type=hf_config.problem_type,
    )
    ignore = getattr(hf_config, "sparse_pred_ignore_index", -100)
    if ignore != -100:
        raise ConfigError(
            f"config.json has sparse_pred_ignore_index={ignore}; FlexBERT's heads ignore label "
            "-100 (transformers' default): relabel with -100"
        )
    names = [str(hf_config.id2label.get(i, f"LABEL_{i}")) for i in range(hf_config.num_labels)]
    named = names != [f"LABEL_{i}" for i in range(hf_config.num_labels)]
    same_count = overrides.get("num_labels", hf_config.num_labels) == hf_config.num_labels
    if named and same_count and len(set(names)) == len(names):  # and usable as names
        values["label_names"] = names
    out_dropout = getattr(hf_config, "attention_out_dropout", None)  # saved by FlexBERT only
    if out_dropout is not None:
        values["attention_out_dropout"] = float(out_dropout)
    mask_id = getattr(hf_config, "mask_token_id", None)
    if mask_id is not None:
        values["mask_token_id"] = mask_id
    elif ModelConfig.mask_token_id >= hf_config.vocab_size and "mask_token_id" not in overrides:
        raise ConfigError(
            f"config.json has no mask_token_id and the ModernBERT default "
            f"{ModelConfig.mask_token_id} is outside vocab_size={hf_config.vocab_size}; "
            "pass mask_token_id=... to from_hf"
        )
    return ModelConfig.from_dict({**values, **overrides})  # unknown override keys: ConfigError


def _act_from_hf(name: str, field: str) -> str:
    if name not in ACT_FROM_HF:
        raise ConfigError(
            f"{field} '{name}' has no FlexBERT equivalent; supported: {sorted(ACT_FROM_HF)}"
        )
    return ACT_FROM_HF[name]


def _pattern_from_types(types: list[str], window: int) -> dict[str, Any]:
    if all(t == "global" for t in types):
        return {"name": "global"}
    for every in range(2, len(types) + 1):
        if types == ["global" if i % every == 0 else "local" for i in range(len(types))]:
            return {"name": "local_global", "window": window, "global_every": every}
    return {"name": "explicit", "types": types, "window": window}


def config_to_hf(cfg: ModelConfig, architecture: str) -> Any:
    """ModelConfig -> transformers ModernBertConfig; refuses what ModernBERT cannot express."""
    from transformers import ModernBertConfig

    problems = unsupported_for_hf(cfg)
    if problems:
        raise ConfigError(
            "this model cannot be saved as Hugging Face ModernBERT: " + "; ".join(problems)
        )
    window = cfg.attention_pattern.window or 128
    hf_config = ModernBertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        hidden_activation=ACT_TO_HF[cfg.activation.name],
        max_position_embeddings=cfg.max_seq_len,
        norm_eps=cfg.norm.eps,
        norm_bias=cfg.norm.bias,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.cls_token_id,
        cls_token_id=cfg.cls_token_id,
        eos_token_id=cfg.sep_token_id,
        sep_token_id=cfg.sep_token_id,
        attention_bias=cfg.qkv_bias,
        attention_dropout=cfg.attention_dropout,
        layer_types=[
            "full_attention" if t == "global" else "sliding_attention" for t in cfg.layer_types
        ],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": cfg.position.global_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.position.local_theta},
        },
        local_attention=window,
        embedding_dropout=cfg.embedding_dropout,
        mlp_bias=cfg.mlp_in_bias,
        mlp_dropout=cfg.mlp_dropout,
        decoder_bias=cfg.decoder_bias,
        classifier_pooling=cfg.pooling.name,
        classifier_dropout=cfg.head_dropout,
        classifier_bias=cfg.head_bias,
        classifier_activation=ACT_TO_HF[cfg.head_activation.name],
        sparse_prediction=cfg.sparse_prediction,
        num_labels=cfg.num_labels,
        problem_type=cfg.problem_type,
        architectures=[architecture],
    )
    if cfg.label_names:
        hf_config.id2label = dict(enumerate(cfg.label_names))
        hf_config.label2id = {name: i for i, name in enumerate(cfg.label_names)}
    # Not ModernBertConfig fields: kept as extra attributes so from_hf restores them.
    hf_config.mask_token_id = cfg.mask_token_id
    if cfg.attention_out_dropout is not None:  # transformers drops out with attention_dropout
        hf_config.attention_out_dropout = cfg.attention_out_dropout
    return hf_config


def unsupported_for_hf(cfg: ModelConfig) -> list[str]:
    """Everything in `cfg` that Hugging Face ModernBERT has no setting for."""
    problems = []
    if cfg.norm.name != "layernorm":
        problems.append(f"norm '{cfg.norm.name}' (ModernBERT uses layernorm)")
    if cfg.position.name != "rope":
        problems.append(f"position '{cfg.position.name}' (ModernBERT uses rope)")
    if cfg.mlp.name != "glu":
        problems.append(f"mlp '{cfg.mlp.name}' (ModernBERT uses glu)")
    for field in ("activation", "head_activation"):
        if getattr(cfg, field).name not in ACT_TO_HF:
            problems.append(f"{field} '{getattr(cfg, field).name}'")
    if cfg.pooling.name not in ("cls", "mean"):
        problems.append(f"pooling '{cfg.pooling.name}'")
    if cfg.qkv_bias != cfg.attn_out_bias:
        problems.append("qkv_bias != attn_out_bias (ModernBERT has one attention_bias)")
    if cfg.mlp_in_bias != cfg.mlp_out_bias:
        problems.append("mlp_in_bias != mlp_out_bias (ModernBERT has one mlp_bias)")
    for flag in ("embedding_norm", "skip_first_prenorm", "final_norm"):
        if not getattr(cfg, flag):
            problems.append(f"{flag}=False (always on in ModernBERT)")
    return problems


# ---------------------------------------------------------------------------- weights
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from model.safetensors (single or sharded) or pytorch_model.bin."""
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    binary = path / "pytorch_model.bin"
    if single.exists():
        return _safe_load(load_file, single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_safe_load(load_file, path / shard))
        return state
    if binary.exists():
        return _safe_load(lambda p: torch.load(p, map_location="cpu", weights_only=True), binary)
    raise FileNotFoundError(
        f"{path} has no weights: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def _safe_load(loader, file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        raise FileNotFoundError(f"weights file {file} is missing")
    try:
        return loader(str(file))
    except Exception as err:  # corrupt or truncated file
        raise CheckpointError(f"cannot read weights from {file}: {err}") from err


def match_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], refit_head: bool = False
) -> dict[str, torch.Tensor]:
    """Align checkpoint keys with `model`'s and fail listing missing/unexpected/mis-shaped keys.
    `refit_head`: the task head's layers of another shape (another label count) are left out,
    to start fresh, instead of refused; the encoder must still fit."""
    own = model.state_dict()
    expects_prefix = any(k.startswith("model.") for k in own)
    has_prefix = any(k.startswith("model.") for k in state)
    if has_prefix and not expects_prefix:  # a head checkpoint into the bare encoder
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    elif expects_prefix and not has_prefix:  # a bare encoder checkpoint into a head
        state = {f"model.{k}": v for k, v in state.items()}
    if refit_head:
        refit = [
            k
            for k, v in state.items()
            if k.startswith(NEW_HEAD_PREFIXES) and k in own and v.shape != own[k].shape
        ]
        if refit:
            log.info("new %s: the checkpoint's have another shape", ", ".join(refit))
        state = {k: v for k, v in state.items() if k not in refit}
    tied = "decoder.weight" in own and "decoder.weight" not in state
    missing = [k for k in own if k not in state and not (tied and k == "decoder.weight")]
    missing = [k for k in missing if not k.startswith(NEW_HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in own and not k.startswith(DROPPABLE_PREFIXES)]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and torch.is_tensor(v) and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append(f"shape mismatches {shapes}")
        raise CheckpointError(
            "checkpoint does not fit " + type(model).__name__ + ": " + "; ".join(parts)
        )
    return {k: v for k, v in state.items() if k in own}


# ---------------------------------------------------------------------------- public
# What a model directory needs from a Hub repository: config, weights, tokenizer files.
HUB_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    # sentence-transformers models: module list, pooling, an encoder in a subfolder
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "*_Pooling/*",
    "*_Normalize/*",
    "0_Transformer/*",
    "*_Dense/*",  # a ColBERT's projection in PyLate's layout
    "*_MultiVectorMask/*",  # a sentence-transformers MultiVectorEncoder's skiplist
    # FlexBertForColBERT.save_hf: the projection's settings (its weights are *.safetensors)
    "colbert_config.json",
]


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local model directory as given; otherwise a Hugging Face Hub id (`org/name`) fetched
    into the Hugging Face cache (with HF_HUB_OFFLINE=1, found there without any network)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = str(name_or_path)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(
            f"{path}: no such directory (and not a Hugging Face Hub id like 'org/name')"
        ) from None
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_FILES))
    except Exception as err:  # noqa: BLE001 - not found, offline, gated: one clear message
        raise FileNotFoundError(
            f"'{name}' is not a local directory, and the Hugging Face Hub model could not be "
            f"fetched or found in the local cache: {type(err).__name__}: {err}"
        ) from None


def load_hf(cls: type, path: str | Path, ignore_mismatched_sizes: bool = False, **overrides: Any):
    """Build `cls` from a Hugging Face ModernBERT directory or Hub id. In a sentence-transformers
    directory the encoder is found through modules.json, and a class that pools like
    sentence-transformers (`POOLING_FROM_SENTENCE_TRANSFORMERS`) takes its Pooling module's mode.
    `ignore_mismatched_sizes`, as transformers' option of that name but for the task head only:
    a classifier of another label count starts fresh instead of being refused."""
    from transformers import AutoConfig

    folder = resolve_model_dir(path)
    path, st_pooling = sentence_transformers_layout(folder)
    if getattr(cls, "POOLING_FROM_SENTENCE_TRANSFORMERS", False):
        check_sentence_transformers_modules(folder)  # its vectors are what this model computes
        if st_pooling:
            overrides.setdefault("pooling", st_pooling)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory: config.json is missing"
        )
    hf_config = AutoConfig.from_pretrained(path)
    if hf_config.model_type != "modernbert":
        raise CheckpointError(
            f"{path} holds a '{hf_config.model_type}' checkpoint; FlexBERT loads 'modernbert' checkpoints"
        )
    model = cls(config_from_hf(hf_config, **overrides))
    state = read_state_dict(path)
    if "decoder.weight" in model.state_dict():  # a head with the tied decoder
        check_tied_decoder(state, hf_config, path)
    state = match_state_dict(model, state, refit_head=ignore_mismatched_sizes)
    fresh = sorted(
        {k.split(".")[0] for k in model.state_dict() if k not in state and k != "decoder.weight"}
    )
    if fresh:  # as transformers warns: these layers need training before the model is used
        log.warning("%s: %s not in the checkpoint, initialised fresh", path, ", ".join(fresh))
    model.load_state_dict(state, strict=False)
    return model


def check_tied_decoder(state: dict[str, torch.Tensor], hf_config: Any, path: Path) -> None:
    """FlexBERT's MLM decoder is the token embedding (ModernBERT ties them); a checkpoint
    whose own decoder differs would load wrong: refused. That holds whatever
    `tie_word_embeddings` says: transformers too leaves two different stored weights untied
    (and loading both into one shared parameter would silently replace the embedding)."""
    decoder = state.get("decoder.weight")
    embedding = state.get("model.embeddings.tok_embeddings.weight")
    if decoder is None or embedding is None:
        return
    if decoder.shape != embedding.shape or not torch.equal(decoder, embedding):
        tied = getattr(hf_config, "tie_word_embeddings", True)
        raise CheckpointError(
            f"{path} has its own MLM decoder weights (tie_word_embeddings={str(tied).lower()}), "
            "unlike the token embedding; FlexBERT ties the decoder to the embedding as "
            "ModernBERT does, so it cannot load this checkpoint's head (its encoder loads "
            "into FlexBertModel)"
        )


def save_hf(model: torch.nn.Module, path: str | Path) -> Path:
    """Write config.json + model.safetensors loadable by transformers' Auto classes."""
    from safetensors.torch import save_file

    name = type(model).__name__
    if name not in HEAD_ARCHITECTURES:
        raise ConfigError(
            f"{name} has no Hugging Face ModernBERT counterpart; use one of {sorted(HEAD_ARCHITECTURES)}"
        )
    hf_config = config_to_hf(model.config, HEAD_ARCHITECTURES[name])
    if not model.config.position.fp32:
        log.warning(
            "%s: this model rotates RoPE in the compute dtype (position.fp32=false); "
            "transformers rotates in fp32, so in bf16 its outputs differ slightly (~1e-2)",
            path,
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state.pop("decoder.weight", None)  # tied to the token embedding; transformers re-ties it
    tmp = path / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    return path
