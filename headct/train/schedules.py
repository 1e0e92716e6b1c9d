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


# ------------------------------------------------------------------------------------------ DINO schedules
# DINO (Caron et al. 2021) schedules, as pure functions of the GLOBAL step (the seed restarted its momentum
# schedule every epoch). ``total_steps`` is the number of optimizer steps of the whole run; the last step run
# is total_steps - 1 and gets the final value.


def teacher_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """EMA momentum of the teacher: half-cosine from ``base`` at step 0 up to ``final`` at the last step.

    Non-decreasing in ``step`` (for base <= final); held at ``final`` beyond the run. Near the end the teacher
    barely moves, which is what makes it a stable target (and the better encoder) late in training.
    """
    return cosine(step, total_steps - 1, base, final)


def teacher_temperature(step: int, warmup_steps: int, warmup_temp: float = 0.04, final_temp: float = 0.07) -> float:
    """Teacher softmax temperature: linear from ``warmup_temp`` at step 0 to ``final_temp`` at ``warmup_steps``,
    then constant. A low temperature at first sharpens the teacher while it is still random, avoiding early
    collapse to the uniform distribution; DINO's default warm-up is 30 epochs."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return final_temp
    return warmup_temp + (final_temp - warmup_temp) * max(step, 0) / warmup_steps


def dino_weight_decay(step: int, total_steps: int, start: float = 0.04, end: float = 0.4) -> float:
    """Weight decay rising by half-cosine from ``start`` at step 0 to ``end`` at the last step (DINO: 0.04 -> 0.4)."""
    return cosine(step, total_steps - 1, start, end)
