"""The schedules of self-supervised training, each a pure function of the 0-based iteration (as dinov2's
CosineScheduler arrays are indexed): teacher momentum, teacher temperature, weight decay, last-layer freeze.

The learning rate is DeepSpeed's WarmupCosineLR (optim.lr, optim.warmup_steps, optim.min_lr_ratio), the shape of
dinov2's. Pure functions of the step make a resumed run (any world size) follow the uninterrupted one exactly:
nothing but the step is needed to know where a schedule stands.
"""

from __future__ import annotations

import math


def cosine(start: float, end: float, iteration: int, total: int) -> float:
    """start at iteration 0, end at `total`, half a cosine between (dinov2's CosineScheduler without warm-up)."""
    progress = min(max(iteration, 0) / max(total, 1), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def teacher_momentum(iteration: int, total: int, start: float = 0.992, end: float = 1.0) -> float:
    """EMA momentum of the teacher: 0.992 -> 1 along a cosine (dinov2 momentum_teacher, final_momentum_teacher)."""
    return cosine(start, end, iteration, total)


def teacher_temperature(iteration: int, warmup_iterations: int, start: float = 0.04, end: float = 0.07) -> float:
    """Linear warm-up from `start` to `end` over `warmup_iterations`, then `end` (dinov2 warmup_teacher_temp,
    teacher_temp, warmup_teacher_temp_epochs; np.linspace(start, end, warmup) indexed by the iteration)."""
    if iteration >= warmup_iterations:
        return end
    if warmup_iterations <= 1:
        return start
    return start + (end - start) * iteration / (warmup_iterations - 1)


def weight_decay(iteration: int, total: int, start: float = 0.04, end: float = 0.4) -> float:
    """Weight decay 0.04 -> 0.4 along a cosine (dinov2 optim.weight_decay, weight_decay_end)."""
    return cosine(start, end, iteration, total)


def last_layer_frozen(iteration: int, freeze_iterations: int) -> bool:
    """The heads' prototype layers get lr 0 for the first iterations (dinov2 freeze_last_layer_epochs): random
    prototypes moving while the backbone is random make training unstable."""
    return iteration < freeze_iterations


def fraction_to_iterations(fraction: float, total: int) -> int:
    """A share of the run (dinov2 states its schedules in epochs of a 100-epoch run) as whole iterations."""
    return int(round(fraction * total))
