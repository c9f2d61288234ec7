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
from models.sample_noise import sample_noise
from sharding.schema import FeatureSchema
from train import checkpoint, engine as ds, stages
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
        micro = math.ceil(len(batch) / cfg.grad_accum_steps)
        parts = [stages.slice_batch(batch, slice(start, start + micro)) for start in range(0, len(batch), micro)]
        assert len(parts) == cfg.grad_accum_steps, "DeepSpeed's accumulation boundary needs A micro-batches per step"
        local_count = sum(stages.label_count(cfg.loss, part, model) for part in parts)
        count = global_label_count(local_count, engine.device)
        scale = (self.world.world_size * cfg.grad_accum_steps / count).float()
        for start, part in zip(range(0, len(batch), micro), parts):
            with sample_noise(model, seeds[start:start + micro]):
                logits = engine.forward(part.images).float()
            loss = stages.loss_sum(cfg.loss, logits, part.to(logits.device), model)
            yield loss / count.float(), loss * scale  # this micro-batch's share of the global batch loss

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


def build_objective(cfg: TrainConfig, world: World, schema: FeatureSchema, model: torch.nn.Module,
                    num_layers: int) -> Objective:
    """The stage's objective; built before the DeepSpeed engine (the SSL teacher copies the fp32 student)."""
    if cfg.stage == "ssl":
        from train.ssl_stage import SSLObjective
        return SSLObjective(cfg, world, model, num_layers)
    return SupervisedObjective(cfg, world, schema, model, num_layers)
