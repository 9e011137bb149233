"""Warmup-stable-decay (trapezoidal) LR schedule, the ModernBERT recipe, as a Composer scheduler.

Linear warmup from 0 to the peak, a long constant plateau, then a decay over the final `t_decay`
of training to `alpha_f` times the peak. The decay shape is 1-sqrt by default
(`1 - sqrt(progress)`, Hägele et al. 2024), which ModernBERT uses; `linear` is also offered.
Composer calls the scheduler with its `State`, so every time unit it knows (tokens, batches,
samples, fractions of the run `dur`) works and resumption needs no scheduler state.
"""

from __future__ import annotations

import math

from composer.core import State, Time, TimeUnit
from composer.optim.scheduler import ComposerScheduler, _convert_time

from flexbert.registry import ConfigError

DECAY_SHAPES = {
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
    "linear": lambda p: 1.0 - p,
}


class WarmupStableDecayScheduler(ComposerScheduler):
    """LR multiplier: warmup over `t_warmup`, constant, decay over the last `t_decay`.

    `t_warmup` and `t_decay` are Composer time strings (`"3000000000tok"`, `"500ba"`,
    `"0.1dur"`). The decay is measured in `max_duration`'s unit, so `t_decay` must be in that
    unit or `dur`.
    """

    def __init__(
        self,
        t_warmup: str | Time = "0.05dur",
        t_decay: str | Time = "0.1dur",
        alpha_f: float = 0.0,
        decay_shape: str = "1-sqrt",
    ) -> None:
        if decay_shape not in DECAY_SHAPES:
            raise ConfigError(
                f"decay_shape must be one of {list(DECAY_SHAPES)}, got {decay_shape!r}"
            )
        self.t_warmup = t_warmup
        self.t_decay = t_decay
        self.alpha_f = alpha_f
        self.decay_shape = decay_shape

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        assert state.max_duration is not None, "max_duration must be set"
        warmup = _convert_time(self.t_warmup, state, ssr)
        decay = _convert_time(self.t_decay, state, ssr)
        total = _convert_time(Time(1.0, TimeUnit.DURATION), state, ssr)
        if decay.value > 0 and decay.unit != total.unit:  # no decay (0tok) fits any unit
            raise ConfigError(
                f"scheduler.t_decay={self.t_decay} must be in max_duration's unit "
                f"({total.unit.value}) or a fraction of it: e.g. scheduler.t_decay=0.1dur"
            )
        now_w = state.timestamp.get(warmup.unit).value
        if warmup.value > 0 and now_w < warmup.value:
            return now_w / warmup.value
        now = state.timestamp.get(total.unit).value
        decay_start = total.value - decay.value
        if decay.value <= 0 or now < decay_start:
            return 1.0
        progress = min(1.0, (now - decay_start) / decay.value)
        return self.alpha_f + (1.0 - self.alpha_f) * DECAY_SHAPES[self.decay_shape](progress)
