"""Learning-rate and weight-decay schedules as pure functions of the global step (so a resumed run agrees)."""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at step total_steps (held there after)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, peak: float, warmup_steps: int, final: float = 0.0) -> float:
    """Linear warm-up to `peak` over `warmup_steps` (step 0 already gets peak / warmup_steps, not 0),
    then a half-cosine to `final` at the last step (total_steps - 1)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, total_steps - 1 - warmup_steps, peak, final)
