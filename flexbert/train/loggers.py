"""Composer loggers, adapted where Composer's last release lags its dependencies.

Composer 0.32's WandBLogger calls `wandb.run.get_url()`, which wandb removed (0.2x+: the
`Run.url` property). `WandBLogger` here restores that one method, then is Composer's logger.
"""

from __future__ import annotations

from typing import Any

from composer.loggers import WandBLogger as _ComposerWandBLogger


def _restore_get_url() -> None:
    from wandb.sdk.wandb_run import Run

    if not hasattr(Run, "get_url"):
        Run.get_url = lambda self: self.url  # type: ignore[attr-defined]


class WandBLogger(_ComposerWandBLogger):
    """Composer's WandBLogger, working with current wandb (offline mode needs no network)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _restore_get_url()
        super().__init__(*args, **kwargs)
