"""The training loop: set-up, train_step, validation, checkpoints, pre-emption and the final export."""

from __future__ import annotations

import math
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from loaders.batch import Batch
from loaders.loader import MixedLoader, build_loader
from loaders.pfair import format_shares
from sharding.config import to_dict
from sharding.schema import FeatureSchema, load_schema
from train import checkpoint, engine as ds, stages, validate
from train.config import TrainConfig
from train.runlog import RunLog, keys_hash
from train.world import World


@dataclass
class Run:
    cfg: TrainConfig
    world: World
    out_dir: Path
    schema: FeatureSchema
    engine: ds.Engine
    loader: MixedLoader
    log: RunLog
    step: int = 0
    stop_signal: int = 0


def _seed(cfg: TrainConfig, step: int, rank: int) -> None:
    # Seeding per step (not once) makes dropout after a resume identical to the uninterrupted run.
    torch.manual_seed(cfg.seed * 1_000_003 + step * 997 + rank)
    np.random.seed((cfg.seed * 7919 + step * 31 + rank) % 2**32)


def setup(cfg: TrainConfig, world: World, resume: str | None) -> Run:
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    ds.init_distributed("nccl" if on_cuda else "gloo")
    if on_cuda:
        torch.cuda.set_device(world.local_rank)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = load_schema()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model, num_layers = stages.build(cfg, schema)
    ds_config = ds.deepspeed_config(cfg, world.world_size, on_cuda)
    engine = ds.Engine(model, ds.param_groups(model, cfg, num_layers), ds_config)
    mix = cfg.data.mix_config(cfg.seed)
    loader = build_loader(cfg.data.loader, mix, world.rank, world.world_size)
    tag = checkpoint.resolve_resume(out_dir, resume)
    step = 0
    if tag is not None:
        client = engine.load(checkpoint.checkpoint_root(out_dir), tag)
        loader.load_state_dict(client["sampler"])
        step = int(client["step"])
    if world.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        ds.write_deepspeed_config(out_dir / "deepspeed.json", ds_config)
    log = RunLog(out_dir, world.is_main, cfg.max_steps, step)
    log.write(f"mix (normalised shares of every global batch of {mix.global_batch_size}): {format_shares(mix.ratios)}")
    if tag is not None:
        log.write(f"resumed from {tag} at step {step} (sampler epoch {loader.sampler.epoch}, "
                  f"batch {loader.sampler.batch_index})")
    return Run(cfg, world, out_dir, schema, engine, loader, log, step)


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def train_step(run: Run, batch: Batch) -> float:
    """Forward/backward over the rank's micro-batches and one optimizer step; returns the mean loss."""
    cfg = run.cfg
    _seed(cfg, run.step, run.world.rank)
    run.engine.train(True)
    micro = math.ceil(len(batch) / cfg.grad_accum_steps)
    losses = []
    for start in range(0, len(batch), micro):
        part = stages.slice_batch(batch, slice(start, start + micro))
        logits = run.engine.forward(part.images).float()
        loss = stages.loss(cfg.loss, logits, part.to(logits.device), run.engine.module)
        mean_loss = _all_reduce([loss.item()])[0] / run.world.world_size
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"loss is {mean_loss} at step {run.step + 1} (rank {run.world.rank} batch keys: "
                               f"{part.keys}); stopping. Lower optim.lr or check these samples' labels.")
        run.engine.backward_step(loss)
        losses.append(mean_loss)
    return float(np.mean(losses))


def _step_record(run: Run, batch: Batch, loss: float, seconds: float, wait: float) -> dict:
    counts = Counter(run.loader.surveys[int(s)] for s in batch.survey)
    totals = _all_reduce([counts.get(name, 0) for name in run.loader.surveys])
    keys_by_rank: list[list[str]] = [[] for _ in range(run.world.world_size)]
    dist.all_gather_object(keys_by_rank, list(batch.keys))
    return {"step": run.step, "loss": loss, "lr": run.engine.lr, "grad_norm": run.engine.grad_norm(),
            "img_per_s": run.cfg.data.global_batch_size / max(seconds, 1e-9),
            "data_wait_fraction": wait / max(seconds, 1e-9), "step_seconds": seconds,
            "epoch": run.loader.sampler.epoch,
            "survey_counts": {name: int(n) for name, n in zip(run.loader.surveys, totals)},
            "batch_keys_hash": keys_hash(keys_by_rank)}


def save(run: Run, reason: str) -> None:
    """Collective checkpoint; rank 0 marks it complete and prunes old ones."""
    tag = checkpoint.tag_for(run.step)
    client = {"step": run.step, "sampler": run.loader.state_dict()}
    run.engine.save(checkpoint.checkpoint_root(run.out_dir), tag, client)
    dist.barrier()
    if run.world.is_main:
        checkpoint.write_meta(run.out_dir, tag, {"step": run.step, "sampler": client["sampler"], "reason": reason,
                                                 "config": to_dict(run.cfg), "schema": run.schema.names,
                                                 "world_size": run.world.world_size})
        checkpoint.prune(run.out_dir, run.cfg.keep_checkpoints)
        run.log.event({"event": "checkpoint", "step": run.step, "tag": tag, "reason": reason})
    dist.barrier()


def _install_signal_handlers(run: Run) -> None:
    def handler(signum, _frame):
        run.stop_signal = signum  # acted on between steps, when every rank can save together
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def _stop_requested(run: Run) -> bool:
    return _all_reduce([float(run.stop_signal)], dist.ReduceOp.MAX)[0] > 0


def train(run: Run) -> dict:
    """Steps until max_steps (or a pre-emption signal); returns the last validation results."""
    cfg, results = run.cfg, {}
    _install_signal_handlers(run)
    if cfg.val_at_start and run.step == 0:
        validate.run_validation(run)
    while run.step < cfg.max_steps:
        stream = iter(run.loader)
        while run.step < cfg.max_steps:
            started = time.perf_counter()
            batch = next(stream, None)
            if batch is None:
                break  # epoch over: the sampler has rolled over, a new stream starts the next epoch
            waited = time.perf_counter() - started
            loss = train_step(run, batch)
            run.step += 1
            if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
                # Collective (counts and keys from every rank): every rank takes this branch at the same steps.
                run.log.step(_step_record(run, batch, loss, time.perf_counter() - started, waited))
            if run.step % cfg.val_every == 0 and run.step < cfg.max_steps:
                results = validate.run_validation(run)
            if run.step % cfg.checkpoint_every == 0 and run.step < cfg.max_steps:
                save(run, "periodic")
            if _stop_requested(run):
                save(run, f"signal {run.stop_signal}")
                run.log.write(f"pre-empted by signal {run.stop_signal}: checkpoint saved at step {run.step}; "
                              "re-run with --resume auto to continue")
                return {"preempted": True}
        stream.close()
    results = validate.run_validation(run)
    save(run, "final")
    if run.world.is_main:
        stages.export(run, run.engine.fp32_state_dict(checkpoint.checkpoint_root(run.out_dir),
                                                      checkpoint.tag_for(run.step)), results)
    dist.barrier()
    return results
