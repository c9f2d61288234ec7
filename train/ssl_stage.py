"""Stage ssl: DINOv2-style self-supervision (DINO + iBOT + KoLeo) as an objective of the one training loop.

A step, for the rank's share of the global batch (its multi-crop views, data.loader.views):
1. schedules (pure functions of the step): teacher temperature, weight decay, last-layer freeze; set on the
   optimizer's groups before the update;
2. iBOT masks of the global crops, drawn per sample from (seed, step, global position) (models.ssl_masks);
3. the teacher pass over all of the rank's micro-batches (no gradients, fp32 weights), then the targets: centering
   or Sinkhorn-Knopp over the GLOBAL batch (all-reduces), and the centres' update;
4. per micro-batch, the student through the DeepSpeed engine (global crops masked, then local crops), its losses
   as shares of the global batch's (models.ssl_arch), backpropagated x W x A as the loop does for every stage;
5. after the optimizer step, the teacher's EMA of the student (momentum schedule).
Every draw and every sum is a function of the global batch and the step, never of its split over ranks and
micro-batches: the same loss on any world size, to float tolerance (tests/test_ssl_runs.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from loaders.batch import Batch
from loaders.shards import unlabeled_surveys
from models.sample_noise import mix32, sample_noise
from models.ssl_arch import LossSettings, SSLMetaArch, SSLNetwork, SSLOutput, Targets
from models.ssl_continued import trainable_summary
from models.ssl_heads import LAST_LAYER
from models.ssl_masks import draw_masks
from train import engine as ds
from train.config import TrainConfig
from train.ssl_knn import KnnProbe
from train.ssl_monitor import MonitorSums, collapse_kind, likely_cause
from train.ssl_schedules import (fraction_to_iterations, last_layer_frozen, teacher_momentum, teacher_temperature,
                                 weight_decay)
from train.ssl_state import TeacherCheckpoint, export_teacher
from train.world import World

VIEW_SALT = 0x71E5_0000  # + view index: the key of a view's dropout and drop path


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def view_seeds(seeds: torch.Tensor, view: int) -> torch.Tensor:
    """(n,) keys of view `view` of each sample, for its dropout and drop path."""
    return mix32(seeds.to(torch.int64) ^ ((VIEW_SALT + view) & 0xFFFFFFFF))


def ssl_param_groups(model: torch.nn.Module, cfg: TrainConfig, num_layers: int) -> tuple[list[dict], list[bool],
                                                                                        list[bool]]:
    """(groups, decays, last_layer): the engine's parameter groups (layer-wise lr decay, patch embedding lr x
    patch_embed_lr_mult, no decay for biases, norms and tokens) with the heads' prototype layers in groups of their
    own (frozen for the first steps); which groups take the weight-decay schedule, which are last layers."""
    groups: dict[tuple, dict[str, Any]] = {}
    decay, top = cfg.optim.layer_decay, num_layers + 1
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(ds.NO_DECAY_SUFFIXES)
        depth = ds.layer_depth(name, num_layers) if decay is not None else top
        patch = ".patch_embeddings." in f".{name}"
        last = LAST_LAYER in name
        scale = (decay ** (top - depth) if decay is not None else 1.0) * (cfg.ssl.patch_embed_lr_mult if patch else 1)
        label = ("last_layer" if last else "top" if depth == top else f"depth{depth}") + ("_patch" if patch else "")
        group = groups.setdefault((no_decay, depth, patch, last), {
            "params": [], "lr": cfg.optim.lr * scale, "lr_scale": scale, "name": label + ("_no_decay" * no_decay),
            "weight_decay": 0.0 if no_decay else cfg.optim.weight_decay})
        group["params"].append(param)
    if not groups:
        raise ValueError("stage 'ssl' leaves no trainable parameters")
    keys = list(groups)
    return [groups[k] for k in keys], [not k[0] for k in keys], [k[3] for k in keys]


class SSLObjective:
    """The ssl stage for train/loop.py (the Objective protocol of train/objective.py)."""

    def __init__(self, cfg: TrainConfig, world: World, student: SSLNetwork, num_layers: int):
        ssl, views = cfg.ssl, cfg.data.loader.views
        self.cfg, self.world, self.student, self.num_layers = cfg, world, student, num_layers
        self.num_global, self.num_local = views.global_crops.count, views.local_crops.count
        patch = student.config.backbone.patch_size
        self.grid = (views.global_crops.size // patch, views.global_crops.size // patch)
        self.micro_size = cfg.data.global_batch_size // (world.world_size * cfg.grad_accum_steps)
        if ssl.koleo_loss_weight > 0 and self.micro_size % ssl.koleo_group_size:
            raise ValueError(
                f"ssl.koleo_group_size={ssl.koleo_group_size} must divide every rank's micro-batch "
                f"({cfg.data.global_batch_size} / ({world.world_size} ranks x {cfg.grad_accum_steps} micro-batches) "
                f"= {self.micro_size}): KoLeo's neighbours are sought within fixed groups of the global batch so the "
                f"loss does not depend on the world size; lower ssl.koleo_group_size or the number of processes")
        self.use_ibot = ssl.ibot_loss_weight > 0 and ssl.masks.sample_probability > 0
        settings = LossSettings(ssl.student_temp, ssl.centering, ssl.sinkhorn_iterations, ssl.dino_loss_weight,
                                ssl.ibot_loss_weight if self.use_ibot else 0.0, ssl.koleo_loss_weight,
                                ssl.koleo_group_size)
        self.meta = SSLMetaArch(student, settings, ssl.centre_momentum, all_reduce_sum, all_reduce_max)
        self.groups, self.decays, self.last_layer = ssl_param_groups(student, cfg, num_layers)
        self.validation_every = ssl.monitor_every
        self.temp_warmup = fraction_to_iterations(ssl.teacher_temp_warmup_fraction, cfg.max_steps)
        self.freeze = fraction_to_iterations(ssl.freeze_last_layer_fraction, cfg.max_steps)
        self.monitor, self.schedule_values, self.warned = MonitorSums(), {}, False
        self.engine: ds.Engine | None = None
        self.log_event: Callable[[dict], None] = lambda record: None
        self.log_write: Callable[[str], None] = lambda text: None

    def param_groups(self) -> list[dict[str, Any]]:
        return self.groups

    def attach(self, engine: ds.Engine, log_event: Callable[[dict], None], log_write: Callable[[str], None]) -> None:
        self.engine, self.log_event, self.log_write = engine, log_event, log_write
        self.meta.teacher.to(engine.device)
        log_write(f"stage ssl: {trainable_summary(self.student)}; {self.num_global} global crops "
                  f"({self.grid[0]}x{self.grid[1]} patches) + {self.num_local} local crops per image; teacher fp32, "
                  f"EMA of {len(self.meta.teacher.ema_names)} tensors")

    def _apply_schedules(self, iteration: int) -> float:
        """Set this step's weight decay and last-layer freeze on the groups; the teacher temperature."""
        ssl, total = self.cfg.ssl, self.cfg.max_steps
        decay = weight_decay(iteration, total, self.cfg.optim.weight_decay, ssl.weight_decay_end)
        frozen = last_layer_frozen(iteration, self.freeze)
        self.engine.set_group_values("weight_decay", [decay if d else 0.0 for d in self.decays])
        self.engine.set_group_values("lr", [0.0 if frozen and last else None for last in self.last_layer])
        temp = teacher_temperature(iteration, self.temp_warmup, ssl.warmup_teacher_temp, ssl.teacher_temp)
        self.schedule_values = {"teacher_temp": temp, "weight_decay": decay, "last_layer_frozen": frozen,
                                "teacher_momentum": teacher_momentum(iteration, total, ssl.momentum_teacher,
                                                                     ssl.final_momentum_teacher)}
        return temp

    def _views(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if not batch.views or batch.num_global_views != self.num_global:
            raise ValueError(f"stage ssl needs the loader's multi-crop views ({self.num_global} global): "
                             f"got {0 if not batch.views else batch.num_global_views}")
        device = self.engine.device
        views = [v.to(device, torch.float32, non_blocking=True) for v in batch.views]
        return views[:self.num_global], views[self.num_global:]

    def _crops(self, views: list[torch.Tensor], part: slice, seeds: torch.Tensor,
               first_view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The part's crops stacked view-major (view 0 of every sample first) and their keys."""
        crops = torch.cat([v[part] for v in views])
        keys = torch.cat([view_seeds(seeds[part], first_view + i) for i in range(len(views))])
        return crops, keys

    def _part_masks(self, masks: torch.Tensor | None, part: slice, n: int) -> torch.Tensor | None:
        if masks is None:
            return None
        return masks.reshape(self.num_global, n, -1)[:, part].reshape(-1, masks.shape[-1]).to(self.engine.device)

    def _teacher_targets(self, globals_: list[torch.Tensor], masks: torch.Tensor | None, parts: list[slice],
                         seeds: torch.Tensor, temp: float, logging: bool) -> list[Targets]:
        """The teacher on every micro-batch of the rank, its targets over the global batch, split per micro-batch."""
        autocast = torch.bfloat16 if self.cfg.precision == "bf16" and self.engine.device.type == "cuda" else None
        n = len(seeds)
        outs = [self.meta.teacher_output(self._crops(globals_, p, seeds, 0)[0], self._part_masks(masks, p, n),
                                         autocast) for p in parts]
        ibot = torch.cat([o.ibot for o in outs]) if self.use_ibot else None
        targets = self.meta.targets(torch.cat([o.dino for o in outs]), ibot, temp)
        if logging:
            self.monitor.add_teacher(targets.dino, torch.cat([o.cls for o in outs]))
        dino = targets.dino.split([len(o.dino) for o in outs])
        ibot = targets.ibot.split([len(o.ibot) for o in outs]) if self.use_ibot else [None] * len(outs)
        return [Targets(d, i) for d, i in zip(dino, ibot)]

    def micro_losses(self, step: int, batch: Batch, seeds: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(share of the global batch loss, what to backpropagate) per micro-batch; see the module docstring."""
        cfg, engine = self.cfg, self.engine
        temp = self._apply_schedules(step - 1)
        logging = step % cfg.log_every == 0 or step == cfg.max_steps
        globals_, locals_ = self._views(batch)
        n, micro = len(batch), math.ceil(len(batch) / cfg.grad_accum_steps)
        parts = [slice(start, start + micro) for start in range(0, n, micro)]
        assert len(parts) == cfg.grad_accum_steps, "DeepSpeed's accumulation boundary needs A micro-batches per step"
        masks = draw_masks(seeds, self.num_global, self.grid, cfg.ssl.masks) if self.use_ibot else None
        targets = self._teacher_targets(globals_, masks, parts, seeds, temp, logging)
        scale = self.world.world_size * cfg.grad_accum_steps  # DeepSpeed averages ranks and micro-batches
        for part, target in zip(parts, targets):
            part_masks = self._part_masks(masks, part, n)
            crops, keys = self._crops(globals_, part, seeds, 0)
            with sample_noise(engine.module, keys):
                student_global = SSLOutput(*engine(crops.to(engine.dtype), bool_masked_pos=part_masks))
            student_local = None
            if locals_:
                crops, keys = self._crops(locals_, part, seeds, self.num_global)
                with sample_noise(engine.module, keys):
                    student_local = SSLOutput(*engine(crops.to(engine.dtype)))
            losses = self.meta.losses(student_global, student_local, part_masks, target, self.num_global,
                                      cfg.data.global_batch_size)
            if logging:
                self.monitor.add_losses(losses)
            yield losses["loss"], losses["loss"] * scale

    def end_step(self, step: int) -> None:
        """After the optimizer step: the teacher moves towards the student."""
        self.meta.teacher.update(self.engine.module, self.schedule_values["teacher_momentum"])

    def log_values(self, step: int) -> dict[str, Any]:
        """Collective (a logging step): the collapse monitors, the loss terms and the schedules; warns once."""
        monitors = self.monitor.reduce(all_reduce_sum)
        kind = collapse_kind(monitors)
        if kind is not None and not self.warned:
            self.warned = True
            settings = {"centering": self.cfg.ssl.centering, "teacher_temp": self.schedule_values["teacher_temp"],
                        "student_temp": self.cfg.ssl.student_temp, "num_global_crops": self.num_global,
                        "global_batch_size": self.cfg.data.global_batch_size}
            cause = likely_cause(kind, monitors, settings)
            self.log_write(f"warning: the ssl monitors say collapse ({kind}) at step {step}: {cause}")
            self.log_event({"event": "collapse_warning", "step": step, "kind": kind, "cause": cause})
        return {"ssl": {**monitors, **self.schedule_values}}

    def checkpoint_engine(self) -> TeacherCheckpoint:
        return TeacherCheckpoint(self.engine, self.meta.teacher, self.world)

    def validator(self, surveys: list[str], names: list[str], on_results: Callable[[int, dict], None]) -> KnnProbe:
        root = self.cfg.data.loader.shard_root
        candidates = self.cfg.data.val_surveys or surveys
        labelled = [s for s in candidates if s not in unlabeled_surveys(root, candidates)]
        backbone = self.meta.teacher.network.backbone
        embed = lambda images: backbone(pixel_values=images).last_hidden_state[:, 0]  # noqa: E731
        return KnnProbe(self.cfg, embed, labelled, names, self.world, self.engine.device, on_results)

    def export(self, out_dir: Path, step: int, results: dict) -> Path:
        return export_teacher(self.cfg, self.meta.teacher, Path(out_dir) / "export", step, results)
