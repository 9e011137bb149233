"""The settings of a ColBERT head (FlexBertForColBERT): their checks, their meaning in saves
from before a setting existed, and reading a saved head back: the colbert_config.json and
projection that `save_hf` writes, or a PyLate / sentence-transformers multi-vector model's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexbert.registry import ConfigError

COLBERT_SETTINGS_FILE = "colbert_config.json"  # beside the encoder that save_hf writes
COLBERT_WEIGHTS_FILE = "colbert_projection.safetensors"
MARKER_KEYS = ("query_marker_id", "document_marker_id")
OPTIONAL_KEYS = (*MARKER_KEYS, "skiplist_ids")  # None when unset (and in older saves)
# Older saves lack these settings: no markers, no skiplist, queries attending their [MASK]s.
SAVED_BEFORE = {**dict.fromkeys(OPTIONAL_KEYS), "attend_to_expansion_tokens": True}


def check_positive_int(name: str, value: Any) -> None:
    """A ColBERT length or size: a positive integer, else a ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: a positive integer, got {value!r}")


def check_colbert_settings(colbert_dim: Any, query_length: Any) -> None:
    check_positive_int("colbert_dim", colbert_dim)
    check_positive_int("query_length", query_length)


def settings_of(saved: dict[str, Any]) -> dict[str, Any]:
    """The ColBERT settings in saved ones (a colbert_config.json or a state's extra state);
    the marker ids and skiplist are None where they were saved before those existed."""
    settings: dict[str, Any] = {k: int(saved[k]) for k in ("colbert_dim", "query_length")}
    for key in MARKER_KEYS:
        settings[key] = None if saved.get(key) is None else int(saved[key])
    listed = saved.get("skiplist_ids")
    settings["skiplist_ids"] = None if listed is None else sorted(int(i) for i in listed)
    attend = saved.get("attend_to_expansion_tokens")
    if attend is not None and not isinstance(attend, bool):
        raise ConfigError(f"attend_to_expansion_tokens: true or false, got {attend!r}")
    settings["attend_to_expansion_tokens"] = True if attend is None else attend  # older: True
    return settings


def read_colbert_settings(folder: Path) -> dict[str, Any] | None:
    """colbert_dim, query_length, the marker ids and the skiplist that
    `FlexBertForColBERT.save_hf` wrote into `folder`, or None when it holds no ColBERT head."""
    settings_file = Path(folder) / COLBERT_SETTINGS_FILE
    if not settings_file.exists():
        if (Path(folder) / COLBERT_WEIGHTS_FILE).exists():  # half a head: not a fresh one
            raise FileNotFoundError(
                f"{folder} has the projection weights {COLBERT_WEIGHTS_FILE} but not "
                f"{COLBERT_SETTINGS_FILE}: copy the whole directory that save_hf wrote"
            )
        return None
    if not (Path(folder) / COLBERT_WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"{folder} has {COLBERT_SETTINGS_FILE} but not the projection weights "
            f"{COLBERT_WEIGHTS_FILE}: copy the whole directory that save_hf wrote"
        )
    return settings_of(json.loads(settings_file.read_text()))


def read_saved_head(folder: Path) -> dict[str, Any] | None:
    """{"settings", "weight"} of the ColBERT head saved in `folder`: FlexBERT's own (save_hf's
    colbert_config.json and projection), else a PyLate or sentence-transformers
    MultiVectorEncoder model's (`colbert_pylate.read_pylate_head`); None when it holds none."""
    settings = read_colbert_settings(folder)
    if settings is None:
        from flexbert.colbert_pylate import read_pylate_head

        return read_pylate_head(Path(folder))
    from safetensors.torch import load_file

    weight = load_file(str(Path(folder) / COLBERT_WEIGHTS_FILE))["weight"]
    return {"settings": settings, "weight": weight}
