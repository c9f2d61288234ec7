"""Domain-adversarial training (DANN) in the supervised stages: which surveys' labels train, and the domain term.

`dann.target_surveys` are surveys of the mix whose labels never train (they may be built unlabeled): their samples
reach the morphology loss with no labels, so they add nothing to its sum nor to its count. With `dann.weight` > 0
every sample of the mix, targets included, also feeds a survey discriminator behind a gradient-reversal layer
(models/dann.py). Its loss is a mean over the global batch: each micro-batch yields its cross-entropy SUM divided
by the global batch size, and backpropagates it x W x A like the morphology loss (train/objective.py), so the
objective does not depend on the world size or accumulation. lambda is a function of the step alone, so a resumed
run reproduces it; the discriminator lives in the model the engine wraps, so its weights and optimizer state are
in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F

from loaders.batch import Batch
from loaders.shards import check_labelled, unlabeled_surveys
from models.backbone import pooled_size
from models.dann import attach_discriminator, dann_lambda
from train.config import TrainConfig


def mixed_surveys(cfg: TrainConfig) -> list[str]:
    """The surveys of the mix in the loader's order (a batch's `survey` indexes it): the discriminator's classes."""
    return list(cfg.data.mix_config(cfg.seed).ratios)


def supervised_surveys(cfg: TrainConfig) -> list[str]:
    """The mixed surveys whose labels train: the mix less dann.target_surveys. A ValueError (before any work) for a
    target survey outside the mix, or DANN settings in stage ssl, which has no morphology loss to keep apart."""
    dann, mixed = cfg.dann, mixed_surveys(cfg)
    if cfg.stage == "ssl" and (dann.enabled or dann.target_surveys):
        raise ValueError("dann.weight and dann.target_surveys apply to the supervised stages (head, full, lora); "
                         "stage 'ssl' already uses every survey without labels")
    dann.check_targets(mixed)
    return [s for s in mixed if s not in dann.target_surveys]


def check_surveys(cfg: TrainConfig) -> None:
    """Before any work: the supervised stages refuse, by name, surveys built unlabeled in data.val_surveys or in
    the mix other than DANN's target surveys; DANN's settings are checked too (supervised_surveys)."""
    labelled = supervised_surveys(cfg)
    if cfg.stage == "ssl":
        return
    try:
        check_labelled(cfg.data.loader.shard_root, [*labelled, *cfg.data.val_surveys], f"stage {cfg.stage!r}")
    except ValueError as err:
        raise ValueError(f"{err}; or list mixed ones in dann.target_surveys (then they feed only the "
                         "domain-adversarial loss)") from None


def drop_labels(batch: Batch, drop: torch.Tensor) -> Batch:
    """`batch` with the labels of the samples where `drop` (N,) is True removed, as an unlabeled survey's are
    (no answer, no votes): they add nothing to a loss sum nor to its label count."""
    keep = ~drop.to(batch.feature_mask.device)
    return dataclasses.replace(batch, features=batch.features * keep[:, None],
                               feature_mask=batch.feature_mask & keep[:, None], votes=batch.votes * keep[:, None],
                               total_votes=batch.total_votes * keep[:, None])


class DomainTerm:
    """The DANN part of a supervised objective: target labels dropped, the discriminator's loss and its log values.

    Built before the engine: with dann.weight > 0 it attaches the discriminator to the model, which the engine then
    wraps (optimized, checkpointed, cast with the rest). The step's sums stay on the device until a logging step.
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module):
        self.cfg, self.dann = cfg, cfg.dann
        self.surveys = mixed_surveys(cfg)
        self.is_target = torch.tensor([s in self.dann.target_surveys for s in self.surveys], dtype=torch.bool)
        self.unlabeled_targets = unlabeled_surveys(cfg.data.loader.shard_root, self.dann.target_surveys)
        if self.enabled:
            attach_discriminator(model, pooled_size(model.config), self.dann.hidden, len(self.surveys), cfg.seed)
        self.lambda_ = 0.0
        self._sums = torch.zeros(2, dtype=torch.float64)  # the step's cross-entropy sum and correct guesses

    @property
    def enabled(self) -> bool:
        return self.dann.enabled

    def to(self, device: torch.device) -> None:
        self._sums = self._sums.to(device)

    def describe(self) -> str:
        targets = f"target surveys {self.dann.target_surveys} (labels unused" + (
            f"; {self.unlabeled_targets} built unlabeled)" if self.unlabeled_targets else ")")
        if not self.enabled:
            return f"dann: weight 0, no discriminator; {targets}"
        text = (f"dann: survey discriminator ({self.dann.hidden} hidden, {len(self.surveys)} surveys {self.surveys}) "
                f"behind gradient reversal, weight {self.dann.weight}, lambda 0 -> "
                f"{dann_lambda(self.cfg.max_steps, self.cfg.max_steps, self.dann.gamma):.3f} (gamma "
                f"{self.dann.gamma}); " + (targets if self.dann.target_surveys else "no target surveys"))
        if self.cfg.stage == "head":
            text += ("\nwarning: stage 'head' freezes the backbone, so the reversed gradient changes nothing: only the "
                     "discriminator learns; use stage 'full' or 'lora' for domain-adversarial features")
        return text

    def supervised_batch(self, batch: Batch) -> Batch:
        """The batch the morphology loss sees: the target surveys' samples without labels."""
        if not self.dann.target_surveys:
            return batch
        return drop_labels(batch, self.is_target.to(batch.survey.device)[batch.survey])

    def start_step(self, step: int) -> float:
        """Step `step` (1-based) begins: its reversal strength; the step's sums restart."""
        self._sums.zero_()
        self.lambda_ = dann_lambda(step, self.cfg.max_steps, self.dann.gamma)
        return self.lambda_

    def loss_sum(self, logits: torch.Tensor, survey: torch.Tensor) -> torch.Tensor:
        """The micro-batch's cross-entropy summed over its samples (the caller divides by the global batch size)."""
        logits, survey = logits.float(), survey.to(logits.device)
        total = F.cross_entropy(logits, survey, reduction="sum")
        correct = (logits.argmax(dim=1) == survey).sum()
        self._sums += torch.stack([total.detach(), correct]).to(torch.float64)
        return total

    def log_values(self) -> dict[str, Any]:
        """Collective (a logging step): the last step's domain loss and discriminator accuracy over its global
        batch, and its lambda."""
        if not self.enabled:
            return {}
        sums = self._sums.clone()
        dist.all_reduce(sums)
        loss, correct = (sums / self.cfg.data.global_batch_size).tolist()
        return {"dann_loss": loss, "dann_acc": correct, "dann_lambda": self.lambda_}

    def val_surveys(self, surveys: list[str]) -> list[str]:
        """The surveys validation scores: the loader's, less those built unlabeled (nothing to score)."""
        assert surveys == self.surveys, "a batch's survey index must be the discriminator's class"
        return [s for s in surveys if s not in self.unlabeled_targets]
