"""The training loop: set-up, train_step, logging, pre-emption and the final export.

Checkpoints (train.checkpoint.Checkpointer) and validation (train.validate.Validator) are components that
take what they need; this module wires them together.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from loaders.batch import Batch
from loaders.include import read_key_files
from loaders.loader import MixedLoader, build_loader
from loaders.pfair import format_shares
from models.sample_noise import sample_seeds
from sharding.config import to_dict
from sharding.schema import FeatureSchema, load_schema
from train import checkpoint, dann, engine as ds, mlflow_tracking, stages
from train.config import TrainConfig
from train.objective import Objective, build_objective
from train.runlog import RunLog
from train.stepstats import StepStats
from train.validate import format_table
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
    validator: Any  # train.validate.Validator, or stage ssl's kNN probe: run(step) -> results by survey
    stats: StepStats
    objective: Objective
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
    identity = {"schema": list(schema.names), "model": to_dict(model.config), "stage": cfg.stage,
                "lora": to_dict(cfg.lora) if cfg.stage == "lora" else None}
    if cfg.stage == "ssl":  # the shapes of the heads and what trains
        ssl = cfg.ssl
        identity["ssl"] = {"dino_head": to_dict(ssl.dino_head), "ibot_separate_head": ssl.ibot_separate_head,
                           "ibot_head": to_dict(ssl.ibot_head) if ssl.ibot_separate_head else None,
                           "continued": to_dict(ssl.continued)}
    # DANN's discriminator: its shape and what its classes are (dann.weight and gamma may change on a resume).
    identity["dann"] = ({"hidden": cfg.dann.hidden, "surveys": dann.mixed_surveys(cfg)} if cfg.dann.enabled
                        else None)
    return identity


def setup(cfg: TrainConfig, world: World, resume: str | None) -> Run:
    dann.check_surveys(cfg)  # before any work: supervised stages refuse unlabeled surveys but DANN's targets
    if cfg.tracking.mlflow:
        mlflow_tracking.check_available()  # on every rank, before any collective
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
    objective = build_objective(cfg, world, schema, model, num_layers)  # before the engine casts the model
    identity = run_identity(cfg, schema, model)
    plan = checkpoint.plan_resume(out_dir, resume, identity, world.world_size, cfg.zero_stage,
                                  checkpoint.shared_resolver(world, cfg.checkpoint_visibility_timeout_s))
    ds_config = ds.deepspeed_config(cfg, world.world_size, on_cuda, load_universal=bool(plan and plan.universal))
    engine = ds.Engine(model, objective.param_groups(), ds_config,
                       keep_fp32_fixed=world.is_main and cfg.precision != "fp32" and cfg.stage != "ssl")
    mix = cfg.data.mix_config(cfg.seed)
    loader = build_loader(cfg.data.loader, mix, world.rank, world.world_size, label_fraction=cfg.data.label_fraction,
                          include_keys=read_key_files(cfg.data.include_keys))
    tracker = None
    if cfg.tracking.mlflow:
        tracker = mlflow_tracking.start(out_dir, to_dict(cfg), uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                                        rank=world.rank, world_size=world.world_size, resumed=plan is not None)
    log = RunLog(out_dir, world.is_main, cfg.max_steps, plan.step if plan else 0, tracker=tracker)
    objective.attach(engine, log.event, log.write)
    meta = {"config": to_dict(cfg), **identity, "world_size": world.world_size}
    checkpointer = checkpoint.Checkpointer(objective.checkpoint_engine(), out_dir, world, cfg.keep_checkpoints, meta,
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

    validator = objective.validator(loader.surveys, schema.names, on_results)
    stats = StepStats(engine.device, world.rank, world.world_size, loader.surveys)
    if mix.schedule is not None:
        log.write(f"mix schedule by step ({mix.schedule.interpolation}; shares of every global batch of "
                  f"{mix.global_batch_size}): {mix.schedule.describe()}")
    else:
        log.write(f"mix (normalised shares of every global batch of {mix.global_batch_size}): "
                  f"{format_shares(mix.ratios)}")
    if cfg.stage == "head" and not (model.config.pretrained or cfg.init_from):
        log.write("warning: stage 'head' freezes a randomly initialised backbone (model.pretrained and init_from "
                  "are unset), so only a head on random features learns; train from scratch with stage 'full' "
                  "(configs/train/cpu.yaml) or point model.pretrained at DINOv2 weights")
    if plan is not None:
        how = f", converted from {plan.saved_world_size} processes" if plan.universal else ""
        log.write(f"resumed from {plan.tag} at step {step}{how} (sampler epoch {loader.sampler.epoch}, "
                  f"batch {loader.sampler.batch_index})")
    return Run(cfg, world, out_dir, schema, engine, loader, log, checkpointer, validator, stats, objective, control,
               step)


def train_step(run: Run, batch: Batch) -> None:
    """Forward/backward over the rank's micro-batches and one optimizer step; losses stay on the device.

    The stage's objective (train.objective) yields each micro-batch's share of the global batch's loss and what to
    backpropagate, so the objective is the global batch's whatever the world size and accumulation. Noise is keyed
    by (seed, step, the sample's place in the global batch): rank r holds places r*n .. r*n + n - 1.
    """
    cfg, world = run.cfg, run.world
    _seed(cfg, run.step)
    run.engine.train(True)
    run.stats.start_step()
    seeds = sample_seeds(cfg.seed, run.step + 1, world.rank * len(batch) + torch.arange(len(batch)))
    for share, backward in run.objective.micro_losses(run.step + 1, batch, seeds):
        run.stats.add(run.step + 1, share)
        run.engine.backward_step(backward)
    run.objective.end_step(run.step + 1)
    run.stats.end_step(run.step + 1, batch.keys, batch.survey)


def _step_record(run: Run, reduced: dict) -> dict:
    """The log record of the step just taken: the step reduction's values, timed over the window."""
    window, seconds = run.window, max(run.window.seconds, 1e-9)
    return {"step": run.step, "loss": reduced["loss"], "lr": run.engine.lr, "lr_groups": run.engine.group_lrs(),
            "grad_norm": run.engine.grad_norm(),
            "img_per_s": run.cfg.data.global_batch_size * window.steps / seconds,
            "data_wait_fraction": window.wait / seconds, "step_seconds": seconds / max(window.steps, 1),
            "epoch": run.loader.sampler.epoch, "survey_counts": reduced["survey_counts"],
            "batch_keys_hash": reduced["batch_keys_hash"], **run.objective.log_values(run.step)}


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
    if run.step % run.objective.validation_every == 0 and not last:
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
        folder = run.objective.export(run.out_dir, run.step, results)
        run.log.event({"event": "export", "step": run.step, "path": str(folder)})
    dist.barrier()
    return results
