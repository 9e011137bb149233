"""The Hydra `model` node -> a validated `flexbert.ModelConfig`.

Fields that a tokenizer determines (`vocab_size` and the four special ids) may say
`from_tokenizer`: they are filled from the tokenizer used for the run, which is the right thing
for a freshly trained one. Explicit values are kept and then checked against the tokenizer, so
a run never trains on ids its model does not expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flexbert import ModelConfig
from flexbert.registry import ConfigError

FROM_TOKENIZER = "from_tokenizer"
TOKENIZER_FIELDS = ("vocab_size", "pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id")


def check_tokenizer_fits(tokenizer: Any, config: ModelConfig) -> None:
    """Refuse a tokenizer whose vocabulary or special ids are not the model config's (a run
    would train, or an export be used, on ids the model does not expect)."""
    from flexbert.data.tokenizer import check_tokenizer_matches

    check_tokenizer_matches(tokenizer, **{k: getattr(config, k) for k in TOKENIZER_FIELDS})


def model_node_dict(node: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Plain dict of the model node, interpolations resolved."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def needs_tokenizer(node: DictConfig | Mapping[str, Any]) -> list[str]:
    """The fields that still say `from_tokenizer`."""
    values = model_node_dict(node)
    return [k for k in TOKENIZER_FIELDS if values.get(k) == FROM_TOKENIZER]


def resolve_model_config(
    node: DictConfig | Mapping[str, Any], tokenizer_ids: Mapping[str, int] | None = None
) -> ModelConfig:
    """Build the ModelConfig; `tokenizer_ids` (see `special_token_ids`) fills `from_tokenizer`.

    Unknown keys fail in `ModelConfig.from_dict` with the key's name.
    """
    values = model_node_dict(node)
    pending = needs_tokenizer(values)
    if pending and tokenizer_ids is None:
        raise ConfigError(
            f"model fields {pending} say '{FROM_TOKENIZER}' but no tokenizer is given"
        )
    for key in pending:
        values[key] = int(tokenizer_ids[key])  # type: ignore[index]
    return ModelConfig.from_dict(values)
