"""Where the Hydra configs live, in a source checkout and in an installed wheel.

A checkout (editable install) keeps `conf/`, `experiments/` and `ablations/` at the repository
root; a wheel ships them inside the package (`flexbert/conf`, ...: pyproject force-includes
them). Experiments and ablations are registered as the Hydra groups `experiment` and `ablation`
so `flexbert-train experiment=modernbert_base_pretrain` composes while the files stay in their
top-level folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # flexbert/
REPO_DIR = PACKAGE_DIR.parent
OVERLAY_GROUPS = {"experiment": "experiments", "ablation": "ablations"}


def _find(name: str) -> Path | None:
    for root in (REPO_DIR, PACKAGE_DIR):
        if (root / name).is_dir():
            return root / name
    return None


def conf_dir() -> Path:
    """The directory holding `pretrain.yaml` and the config groups."""
    found = _find("conf")
    if found is None or not (found / "pretrain.yaml").exists():
        raise FileNotFoundError(
            f"FlexBERT configs not found: looked for conf/pretrain.yaml in {REPO_DIR} and "
            f"{PACKAGE_DIR}"
        )
    return found


def overlay_dir(group: str) -> Path | None:
    """`experiments/` (group `experiment`) or `ablations/` (group `ablation`), if present."""
    return _find(OVERLAY_GROUPS[group])


def _package_of(path: Path) -> str:
    """The `# @package` header of a YAML file (overlays default to `_global_`)."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("# @package"):
            return line.removeprefix("# @package").strip()
        if line and not line.startswith("#"):
            break
    return "_global_"


def register_overlays() -> dict[str, list[str]]:
    """Register every experiments/*.yaml and ablations/*.yaml in Hydra's ConfigStore.

    Returns the registered names per group. Safe to call more than once.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    names: dict[str, list[str]] = {}
    for group in OVERLAY_GROUPS:
        folder = overlay_dir(group)
        files = sorted(folder.glob("*.yaml")) if folder else []
        for f in files:
            store.store(group=group, name=f.stem, node=OmegaConf.load(f), package=_package_of(f))
        names[group] = [f.stem for f in files]
    return names


APPS = ("pretrain", "finetune")


def compose_config(
    app: str, overrides: Sequence[str] = (), return_hydra_config: bool = False
) -> DictConfig:
    """conf/<app>.yaml ("pretrain" for flexbert-train, "finetune" for flexbert-finetune) with
    command-line style `overrides`, composed as the command would compose it: for notebooks
    and scripts that call `flexbert.train.pretrain.train(cfg, run_dir)` and the like."""
    from hydra import compose, initialize_config_dir

    if app not in APPS:
        raise ValueError(f"compose_config: app must be one of {APPS}, got {app!r}")
    register_overlays()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(app, overrides=list(overrides), return_hydra_config=return_hydra_config)
