"""Domain-adversarial training (DANN, Ganin et al. 2016): a survey discriminator behind a gradient-reversal layer.

The discriminator reads the pooled backbone features (what the morphology head reads) and guesses each galaxy's
survey; the reversal layer passes its features through unchanged and multiplies the gradient flowing back into the
backbone by -lambda, so the discriminator learns to tell surveys apart while the backbone learns features it
cannot. lambda follows the paper's schedule from 0 to 1 over the run, a pure function of the step (so a resumed
run reproduces it). Training only: exports drop the discriminator (train/objective.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

DISCRIMINATOR = "discriminator"  # the attribute of MorphologyModel, and the prefix of its state-dict keys


@dataclass(frozen=True)
class DANNConfig:
    """`dann:` of a training run (stages head, full and LoRA). weight 0 builds nothing: a plain run."""
    weight: float = 0.0  # of the domain loss (mean cross-entropy over the global batch) beside the morphology loss
    gamma: float = 10.0  # lambda_p = 2 / (1 + exp(-gamma p)) - 1, p = step / max_steps (the paper's 10)
    hidden: int = 256  # the discriminator's hidden width
    # Surveys of the mix whose labels are never used: they feed the domain loss only, and may be built unlabeled.
    target_surveys: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.weight >= 0:
            raise ValueError(f"dann.weight must be >= 0, got {self.weight!r}")
        if not self.gamma > 0:
            raise ValueError(f"dann.gamma must be > 0, got {self.gamma!r}")
        if self.hidden < 1:
            raise ValueError(f"dann.hidden must be >= 1, got {self.hidden!r}")
        if len(set(self.target_surveys)) != len(self.target_surveys):
            raise ValueError(f"dann.target_surveys names a survey twice: {self.target_surveys}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def check_targets(self, mixed: list[str]) -> None:
        """A ValueError naming every target survey that is not in the mix (it would never be seen)."""
        missing = [s for s in self.target_surveys if s not in mixed]
        if missing:
            raise ValueError(f"dann.target_surveys {missing} are not in the mix {mixed}: a target survey feeds the "
                             "domain loss from the mixed batches, so add it to data.mix")


def dann_lambda(step: int, max_steps: int, gamma: float) -> float:
    """The reversal strength of training step `step` (1-based) of `max_steps`: 0 at the start, near 1 at the end."""
    progress = min(max(step / max_steps, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient times -lambda backward (none for lambda itself)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lambda_ * grad, None


def reverse_gradient(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    return GradientReversal.apply(x, lambda_)


class SurveyDiscriminator(nn.Sequential):
    """MLP: Linear(features, hidden), GELU, Linear(hidden, surveys) -> survey logits."""

    def __init__(self, in_features: int, hidden: int, num_surveys: int):
        super().__init__(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_surveys))


def attach_discriminator(model: nn.Module, in_features: int, hidden: int, num_surveys: int, seed: int) -> None:
    """Give `model` (a MorphologyModel) its discriminator, initialised from `seed` on a forked RNG: the global RNG,
    and so every other weight and draw of the run, stays what it is in a run without one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        setattr(model, DISCRIMINATOR, SurveyDiscriminator(in_features, hidden, num_surveys))


def without_discriminator(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of the plain model (what exports hold)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(DISCRIMINATOR + ".")}
