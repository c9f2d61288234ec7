"""What a training step optimises, per stage: the supervised morphology loss, or self-supervision (train/ssl_stage.py).

The loop (train/loop.py) owns the step: the batch, the per-sample seeds, backward and optimizer step, statistics,
logging, checkpoints. An objective owns what differs between stages: parameter groups, the micro-batch losses of a
global batch, work after the optimizer step (the SSL teacher's EMA), extra log values, the validator, what a
checkpoint holds besides DeepSpeed's state, and the export.

Both objectives keep the house rule: a micro-batch yields its SHARE of the global batch's loss (a sum over its
samples divided by a count of the whole global batch), so the shares of any split add up to the same objective.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from loaders.batch import Batch
from models.dann import without_discriminator
from models.sample_noise import sample_noise
from sharding.schema import FeatureSchema
from train import checkpoint, dann, engine as ds, stages
from train.config import TrainConfig
from train.validate import Validator
from train.world import World


class Objective(Protocol):
    validation_every: int

    def param_groups(self) -> list[dict[str, Any]]: ...
    def attach(self, engine: ds.Engine, log_event: Callable[[dict], None],
               log_write: Callable[[str], None]) -> None: ...
    def micro_losses(self, step: int, batch: Batch,
                     seeds: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def end_step(self, step: int) -> None: ...
    def log_values(self, step: int) -> dict[str, Any]: ...
    def checkpoint_engine(self) -> checkpoint.CheckpointEngine: ...
    def validator(self, surveys: list[str], names: list[str], on_results: Callable[[int, dict], None]) -> Any: ...
    def export(self, out_dir: Path, step: int, results: dict) -> Path: ...


def global_label_count(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Collective: the labels of the whole global batch (what its loss is divided by), at least 1.

    Summed on the training device (NCCL queues it on the stream), so the host never waits for it.
    """
    total = local.detach().to(device, torch.float64, non_blocking=True).reshape(1)
    dist.all_reduce(total)
    return total.clamp(min=1.0).reshape(())


class SupervisedObjective:
    """Stages head, full and LoRA: the morphology loss summed over the global batch's labels / their count."""

    def __init__(self, cfg: TrainConfig, world: World, schema: FeatureSchema, model: torch.nn.Module,
                 num_layers: int):
        self.cfg, self.world, self.schema, self.model, self.num_layers = cfg, world, schema, model, num_layers
        self.validation_every = cfg.val_every
        self.engine: ds.Engine | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        return ds.param_groups(self.model, self.cfg, self.num_layers)

    def attach(self, engine: ds.Engine, log_event: Callable[[dict], None], log_write: Callable[[str], None]) -> None:
        self.engine = engine

    def micro_losses(self, step: int, batch: Batch, seeds: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(share of the global batch loss, what to backpropagate) per micro-batch.

        The objective is sum(label losses) / global label count, whatever the world size W and accumulation A:
        DeepSpeed divides each micro-batch's gradient by A and averages ranks (divides by W), so each micro-batch
        backpropagates its loss sum x W x A / count. Dropout is keyed by the sample's place in the global batch
        (models.sample_noise), so the same galaxy gets the same mask on any split.
        """
        cfg, engine, model = self.cfg, self.engine, self.engine.module
        parts, count, scale = self._split(batch)
        for where, part in parts:
            with sample_noise(model, seeds[where]):
                logits = engine.forward(part.images).float()
            loss = stages.loss_sum(cfg.loss, logits, part.to(logits.device), model)
            yield loss / count.float(), loss * scale  # this micro-batch's share of the global batch loss

    def _split(self, batch: Batch) -> tuple[list[tuple[slice, Batch]], torch.Tensor, torch.Tensor]:
        """Collective: the step's A micro-batches (with their places in the rank's batch), the global batch's label
        count and what scales a micro-batch's loss sum into what it backpropagates (W x A / count)."""
        cfg, model = self.cfg, self.engine.module
        micro = math.ceil(len(batch) / cfg.grad_accum_steps)
        parts = [(where, stages.slice_batch(batch, where))
                 for where in (slice(start, start + micro) for start in range(0, len(batch), micro))]
        assert len(parts) == cfg.grad_accum_steps, "DeepSpeed's accumulation boundary needs A micro-batches per step"
        local_count = sum(stages.label_count(cfg.loss, part, model) for _, part in parts)
        count = global_label_count(local_count, self.engine.device)
        return parts, count, (self.world.world_size * cfg.grad_accum_steps / count).float()

    def end_step(self, step: int) -> None:
        pass

    def log_values(self, step: int) -> dict[str, Any]:
        return {}

    def checkpoint_engine(self) -> checkpoint.CheckpointEngine:
        return self.engine

    def validator(self, surveys: list[str], names: list[str], on_results: Callable[[int, dict], None]) -> Validator:
        return Validator(self.cfg, self.engine, surveys, names, self.world, on_results)

    def export(self, out_dir: Path, step: int, results: dict) -> Path:
        """Rank 0: the consolidated fp32 weights of the final checkpoint, exported with the stage's provenance."""
        weights = self.engine.fp32_state_dict(checkpoint.checkpoint_root(out_dir), checkpoint.tag_for(step))
        return stages.export(self.cfg, self.schema, step, weights, out_dir / "export", results)


class AdversarialObjective(SupervisedObjective):
    """The supervised objective with DANN (train/dann.py): target surveys' labels never train, and with dann.weight
    > 0 each micro-batch adds weight x its share of the survey discriminator's mean cross-entropy over the global
    batch. The logged `loss` stays the morphology loss; the domain loss, accuracy and lambda are logged beside it."""

    def __init__(self, cfg: TrainConfig, world: World, schema: FeatureSchema, model: torch.nn.Module,
                 num_layers: int):
        self.domain = dann.DomainTerm(cfg, model)  # attaches the discriminator before the groups are made
        super().__init__(cfg, world, schema, model, num_layers)

    def attach(self, engine: ds.Engine, log_event: Callable[[dict], None], log_write: Callable[[str], None]) -> None:
        super().attach(engine, log_event, log_write)
        self.domain.to(engine.device)
        log_write(self.domain.describe())

    def micro_losses(self, step: int, batch: Batch, seeds: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batch = self.domain.supervised_batch(batch)
        if not self.domain.enabled:
            yield from super().micro_losses(step, batch, seeds)
            return
        cfg, engine, model = self.cfg, self.engine, self.engine.module
        parts, count, scale = self._split(batch)
        domain_lambda = self.domain.start_step(step)
        # Every sample has a survey, so the domain loss's global count is the global batch size: no collective.
        domain_scale = cfg.dann.weight * self.world.world_size * cfg.grad_accum_steps / cfg.data.global_batch_size
        for where, part in parts:
            with sample_noise(model, seeds[where]):
                logits, domain_logits = engine(part.images.to(engine.device, engine.dtype, non_blocking=True),
                                               with_other=True, domain_lambda=domain_lambda)
            logits = logits.float()
            loss = stages.loss_sum(cfg.loss, logits, part.to(logits.device), model)
            domain = self.domain.loss_sum(domain_logits, part.survey)
            # + 0 x the domain loss: exactly the morphology share, but a non-finite domain loss stops the run too.
            yield loss / count.float() + 0.0 * domain.detach(), loss * scale + domain * domain_scale

    def log_values(self, step: int) -> dict[str, Any]:
        return self.domain.log_values()

    def validator(self, surveys: list[str], names: list[str], on_results: Callable[[int, dict], None]) -> Validator:
        return super().validator(self.domain.val_surveys(surveys), names, on_results)

    def export(self, out_dir: Path, step: int, results: dict) -> Path:
        """Rank 0: the final checkpoint's weights less the discriminator, exported as a plain model."""
        weights = self.engine.fp32_state_dict(checkpoint.checkpoint_root(out_dir), checkpoint.tag_for(step))
        return stages.export(self.cfg, self.schema, step, without_discriminator(weights), out_dir / "export", results)


def build_objective(cfg: TrainConfig, world: World, schema: FeatureSchema, model: torch.nn.Module,
                    num_layers: int) -> Objective:
    """The stage's objective; built before the DeepSpeed engine (the SSL teacher copies the fp32 student, DANN's
    discriminator joins the model). dann.weight 0 without target surveys is the plain objective, step for step."""
    if cfg.stage == "ssl":
        from train.ssl_stage import SSLObjective
        return SSLObjective(cfg, world, model, num_layers)
    if cfg.dann.enabled or cfg.dann.target_surveys:
        return AdversarialObjective(cfg, world, schema, model, num_layers)
    return SupervisedObjective(cfg, world, schema, model, num_layers)
