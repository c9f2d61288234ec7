"""The training loop: set-up, train_step, logging, pre-emption and the final export.

Checkpoints (train.checkpoint.Checkpointer) and validation (train.validate.Validator) are components that
take what they need; this module wires them together.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from loaders.batch import Batch
from loaders.loader import MixedLoader, build_loader
from loaders.pfair import format_shares
from loaders.shards import check_labelled
from models.sample_noise import sample_noise, sample_seeds
from sharding.config import to_dict
from sharding.schema import FeatureSchema, load_schema
from train import checkpoint, engine as ds, stages
from train.config import TrainConfig
from train.runlog import RunLog
from train.stepstats import StepStats
from train.validate import Validator, format_table
from train.world import World


@dataclass
class Window:
    """Host time of the steps since the last log record (validation and checkpoints left out)."""
    steps: int = 0
    seconds: float = 0.0
    wait: float = 0.0


@dataclass
class Run:
    cfg: TrainConfig
    world: World
    out_dir: Path
    schema: FeatureSchema
    engine: ds.Engine
    loader: MixedLoader
    log: RunLog
    checkpointer: checkpoint.Checkpointer
    validator: Validator
    stats: StepStats
    control: dist.ProcessGroup | None = None  # host-side group for the stop flag (gloo beside NCCL)
    step: int = 0
    stop_signal: int = 0
    window: Window = field(default_factory=Window)


def _seed(cfg: TrainConfig, step: int) -> None:
    # Dropout draws per sample (models.sample_noise); anything else drawing from the global RNGs during a step gets
    # the same stream on every rank and after a resume, never a rank's own.
    torch.manual_seed(cfg.seed * 1_000_003 + step * 997)
    np.random.seed((cfg.seed * 7919 + step * 31) % 2**32)


def run_identity(cfg: TrainConfig, schema: FeatureSchema, model: torch.nn.Module) -> dict:
    """What a resumed run must share with the run that saved the checkpoint."""
    return {"schema": list(schema.names), "model": to_dict(model.config), "stage": cfg.stage,
            "lora": to_dict(cfg.lora) if cfg.stage == "lora" else None}


def setup(cfg: TrainConfig, world: World, resume: str | None) -> Run:
    if cfg.stage in ("head", "full", "lora"):  # supervised: refuse unlabeled surveys before any work
        check_labelled(cfg.data.loader.shard_root, [*cfg.data.mix_config(cfg.seed).ratios, *cfg.data.val_surveys],
                       f"stage {cfg.stage!r}")
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    ds.init_distributed("nccl" if on_cuda else "gloo")
    if on_cuda:
        torch.cuda.set_device(world.local_rank)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = load_schema()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model, num_layers = stages.build(cfg, schema)
    identity = run_identity(cfg, schema, model)
    plan = checkpoint.plan_resume(out_dir, resume, identity, world.world_size, cfg.zero_stage,
                                  checkpoint.shared_resolver(world, cfg.checkpoint_visibility_timeout_s))
    ds_config = ds.deepspeed_config(cfg, world.world_size, on_cuda, load_universal=bool(plan and plan.universal))
    engine = ds.Engine(model, ds.param_groups(model, cfg, num_layers), ds_config,
                       keep_fp32_fixed=world.is_main and cfg.precision != "fp32")
    mix = cfg.data.mix_config(cfg.seed)
    loader = build_loader(cfg.data.loader, mix, world.rank, world.world_size, label_fraction=cfg.data.label_fraction)
    log = RunLog(out_dir, world.is_main, cfg.max_steps, plan.step if plan else 0)
    meta = {"config": to_dict(cfg), **identity, "world_size": world.world_size}
    checkpointer = checkpoint.Checkpointer(engine, out_dir, world, cfg.keep_checkpoints, meta,
                                           ds.convert_to_universal, log.event, cfg.checkpoint_visibility_timeout_s)
    step = 0
    if plan is not None:
        client = checkpointer.load(plan)
        loader.load_state_dict(client["sampler"])
        step = int(client["step"])
    if world.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        ds.write_deepspeed_config(out_dir / "deepspeed.json", ds_config)

    def on_results(at_step: int, results: dict) -> None:
        log.event({"event": "validation", "step": at_step, "surveys": results})
        log.write(format_table(results, at_step))

    validator = Validator(cfg, engine, loader.surveys, schema.names, world, on_results)
    stats = StepStats(engine.device, world.rank, world.world_size, loader.surveys)
    log.write(f"mix (normalised shares of every global batch of {mix.global_batch_size}): {format_shares(mix.ratios)}")
    if cfg.stage == "head" and not (model.config.pretrained or cfg.init_from):
        log.write("warning: stage 'head' freezes a randomly initialised backbone (model.pretrained and init_from "
                  "are unset), so only a head on random features learns; train from scratch with stage 'full' "
                  "(configs/train/cpu.yaml) or point model.pretrained at DINOv2 weights")
    if plan is not None:
        how = f", converted from {plan.saved_world_size} processes" if plan.universal else ""
        log.write(f"resumed from {plan.tag} at step {step}{how} (sampler epoch {loader.sampler.epoch}, "
                  f"batch {loader.sampler.batch_index})")
    return Run(cfg, world, out_dir, schema, engine, loader, log, checkpointer, validator, stats, control, step)


def global_label_count(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Collective: the labels of the whole global batch (what its loss is divided by), at least 1.

    Summed on the training device (NCCL queues it on the stream), so the host never waits for it.
    """
    total = local.detach().to(device, torch.float64, non_blocking=True).reshape(1)
    dist.all_reduce(total)
    return total.clamp(min=1.0).reshape(())


def train_step(run: Run, batch: Batch) -> None:
    """Forward/backward over the rank's micro-batches and one optimizer step; losses stay on the device.

    The objective is the global batch's loss, sum(label losses) / global label count, whatever the world size W
    and accumulation A: DeepSpeed divides each micro-batch's gradient by A and averages ranks (divides by W), so
    each micro-batch backpropagates its loss sum x W x A / count. Dropout is keyed by the sample's place in the
    global batch (models.sample_noise), so the same galaxy gets the same mask on any split.
    """
    cfg, world, model = run.cfg, run.world, run.engine.module
    _seed(cfg, run.step)
    run.engine.train(True)
    run.stats.start_step()
    micro = math.ceil(len(batch) / cfg.grad_accum_steps)
    parts = [stages.slice_batch(batch, slice(start, start + micro)) for start in range(0, len(batch), micro)]
    assert len(parts) == cfg.grad_accum_steps, "DeepSpeed's accumulation boundary needs A micro-batches per step"
    local_count = sum(stages.label_count(cfg.loss, part, model) for part in parts)
    count = global_label_count(local_count, run.engine.device)
    scale = (world.world_size * cfg.grad_accum_steps / count).float()
    seeds = sample_seeds(cfg.seed, run.step + 1, world.rank * len(batch) + torch.arange(len(batch)))
    for start, part in zip(range(0, len(batch), micro), parts):
        with sample_noise(model, seeds[start:start + micro]):
            logits = run.engine.forward(part.images).float()
        loss = stages.loss_sum(cfg.loss, logits, part.to(logits.device), model)
        run.stats.add(run.step + 1, loss / count.float())  # this micro-batch's share of the global batch loss
        run.engine.backward_step(loss * scale)
    run.stats.end_step(run.step + 1, batch.keys, batch.survey)


def _step_record(run: Run, reduced: dict) -> dict:
    """The log record of the step just taken: the step reduction's values, timed over the window."""
    window, seconds = run.window, max(run.window.seconds, 1e-9)
    return {"step": run.step, "loss": reduced["loss"], "lr": run.engine.lr, "lr_groups": run.engine.group_lrs(),
            "grad_norm": run.engine.grad_norm(),
            "img_per_s": run.cfg.data.global_batch_size * window.steps / seconds,
            "data_wait_fraction": window.wait / seconds, "step_seconds": seconds / max(window.steps, 1),
            "epoch": run.loader.sampler.epoch, "survey_counts": reduced["survey_counts"],
            "batch_keys_hash": reduced["batch_keys_hash"]}


def save(run: Run, reason: str) -> bool:
    """Collective checkpoint of the step just taken; False when that step is already saved."""
    return run.checkpointer.save(run.step, {"step": run.step, "sampler": run.loader.state_dict()}, reason)


def _install_signal_handlers(run: Run) -> None:
    def handler(signum, _frame):
        run.stop_signal = signum  # acted on between steps, when every rank can save together
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def _stop_requested(run: Run) -> bool:
    """Collective over host memory (gloo): no device synchronisation."""
    flag = torch.tensor([run.stop_signal], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=run.control)
    return int(flag.item()) > 0


def _after_step(run: Run, started: float, waited: float) -> dict | None:
    """Logging, validation and periodic checkpoints after a step; returns validation results if it ran."""
    cfg, results = run.cfg, None
    last = run.step == cfg.max_steps
    checkpoint_due = run.step % cfg.checkpoint_every == 0 and not last
    logging = run.step % cfg.log_every == 0 or last
    # The step reduction (the host's one wait for the device): raises on a non-finite loss before any save.
    reduced = run.stats.reduce() if logging or checkpoint_due else None
    run.window.steps += 1
    run.window.seconds += time.perf_counter() - started
    run.window.wait += waited
    if logging:
        run.log.step(_step_record(run, reduced))
        run.window = Window()
    if run.step % cfg.val_every == 0 and not last:
        results = run.validator.run(run.step)
    if checkpoint_due:
        save(run, "periodic")
    return results


def train(run: Run) -> dict:
    """Steps until max_steps (or a pre-emption signal); returns the last validation results."""
    cfg, results = run.cfg, {}
    _install_signal_handlers(run)
    if cfg.val_at_start and run.step == 0:
        run.validator.run(0)
    while run.step < cfg.max_steps:
        stream = iter(run.loader)
        while run.step < cfg.max_steps:
            started = time.perf_counter()
            batch = next(stream, None)
            if batch is None:
                break  # epoch over: the sampler has rolled over, a new stream starts the next epoch
            waited = time.perf_counter() - started
            train_step(run, batch)
            run.step += 1
            results = _after_step(run, started, waited) or results
            if _stop_requested(run):
                run.stats.reduce()  # a non-finite loss since the last reduction must not be checkpointed
                saved = save(run, f"signal {run.stop_signal}")
                where = "saved" if saved else "already saved"
                run.log.write(f"pre-empted by signal {run.stop_signal}: checkpoint {where} at step {run.step}; "
                              "re-run with --resume auto to continue")
                return {"preempted": True}
        stream.close()
    results = run.validator.run(run.step)
    save(run, "final")
    if run.world.is_main:
        weights = run.engine.fp32_state_dict(checkpoint.checkpoint_root(run.out_dir), checkpoint.tag_for(run.step))
        folder = stages.export(cfg, run.schema, run.step, weights, run.out_dir / "export", results)
        run.log.event({"event": "export", "step": run.step, "path": str(folder)})
    dist.barrier()
    return results
