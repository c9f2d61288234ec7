"""DeepSpeed ZeRO: config mapping, engine set-up, steps, checkpoints, universal conversion and the fp32 export
(the only deepspeed importer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from train.config import TrainConfig

# ZeRO's partition all-gathers call torch.distributed.all_gather_into_tensor, which torch deprecates with a
# FutureWarning that reappears on every log step. DeepSpeed's call, not ours: silence exactly that one.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning, module=r"torch\.distributed")

NO_DECAY_SUFFIXES = ("bias", "norm.weight", "layernorm.weight", "layer_norm.weight", "lambda1", "position_embeddings",
                     "cls_token", "mask_token")


def init_distributed(backend: str) -> None:
    """Join the process group described by the torch.distributed variables (RANK, WORLD_SIZE, MASTER_*)."""
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def end_distributed() -> None:
    """Leave every process group, with DeepSpeed's cached groups: torch's call alone would leave DeepSpeed holding
    groups that a later run in this process cannot use ("Group ... is not registered")."""
    deepspeed.comm.destroy_process_group()


def _optimizer(cfg: TrainConfig, on_cuda: bool) -> dict[str, Any]:
    optim = cfg.optim
    params: dict[str, Any] = {"lr": optim.lr, "betas": list(optim.betas), "eps": 1e-8,
                              "weight_decay": optim.weight_decay}
    if optim.implementation == "torch":
        # torch.optim.AdamW: DeepSpeed's FusedAdam would JIT-compile a CUDA op (nvcc + ninja) on first use.
        # DeepSpeed passes the remaining params to the constructor, so fused=True selects torch's fused kernel.
        params["torch_adam"] = True
        if on_cuda:
            params["fused"] = True
    return {"type": "AdamW", "params": params}


def deepspeed_config(cfg: TrainConfig, world_size: int, on_cuda: bool, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON for a run; written next to the run so it can be inspected and reused.

    `load_universal`: the run resumes a checkpoint written by another world size, in DeepSpeed's universal form.
    """
    per_step = world_size * cfg.grad_accum_steps
    if cfg.data.global_batch_size % per_step:
        raise ValueError(f"data.global_batch_size={cfg.data.global_batch_size} must be divisible by world size "
                         f"({world_size}) x grad_accum_steps ({cfg.grad_accum_steps})")
    optim = cfg.optim
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero3_param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = cfg.zero3_param_persistence_threshold
    config = {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.global_batch_size // per_step,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "optimizer": _optimizer(cfg, on_cuda),
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.max_steps, "warmup_num_steps": max(1, min(optim.warmup_steps, cfg.max_steps)),
            "warmup_min_ratio": 0.0, "cos_min_ratio": optim.min_lr_ratio, "warmup_type": "linear"}},
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for encoder layer i, num_layers+1 for everything above the encoder."""
    if ".embeddings." in f".{name}":
        return 0
    marker = "encoder.layer."
    if marker in name:
        return int(name.split(marker, 1)[1].split(".", 1)[0]) + 1
    return num_layers + 1


def param_groups(model: torch.nn.Module, cfg: TrainConfig, num_layers: int) -> list[dict[str, Any]]:
    """Trainable parameters grouped by weight decay and (optionally) layer-wise learning-rate decay.

    Each group also has a `name` and its `lr_scale` (lr = base lr x lr_scale), which the log uses.
    """
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    decay = cfg.optim.layer_decay
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)
        depth = layer_depth(name, num_layers) if decay is not None else num_layers + 1
        scale = decay ** (num_layers + 1 - depth) if decay is not None else 1.0
        label = ("top" if depth == num_layers + 1 else f"depth{depth}") + ("_no_decay" if no_decay else "")
        group = groups.setdefault((no_decay, depth), {"params": [], "lr": cfg.optim.lr * scale, "lr_scale": scale,
                                                     "name": label,
                                                     "weight_decay": 0.0 if no_decay else cfg.optim.weight_decay})
        group["params"].append(param)
    if not groups:
        raise ValueError(f"stage {cfg.stage!r} leaves no trainable parameters")
    return list(groups.values())


class Engine:
    """A model wrapped by DeepSpeed: forward, backward+step, checkpoints, fp32 weights.

    `keep_fp32_fixed`: keep a CPU copy of the tensors the optimizer does not own (frozen parameters, buffers).
    Under bf16 DeepSpeed casts the whole module, so those come back bf16-rounded from the module and from a
    checkpoint; the export takes them from this copy (they never change). Only the exporting rank needs it.
    """

    def __init__(self, model: torch.nn.Module, groups: list[dict[str, Any]], ds_config: dict[str, Any],
                 keep_fp32_fixed: bool = False):
        self.config = ds_config
        self.group_names = [g["name"] for g in groups]
        self.group_scales = [g["lr_scale"] for g in groups]
        self._group_weight_decay = [g["weight_decay"] for g in groups]
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        self._fixed = ({name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()
                        if name not in trainable} if keep_fp32_fixed else None)
        plain = [{k: v for k, v in g.items() if k not in ("name", "lr_scale")} for g in groups]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=plain, config=ds_config)
        self.dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def zero_stage(self) -> int:
        return int(self.config["zero_optimization"]["stage"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw logits (named answers + the implicit 'other' answers) that the losses need."""
        return self.engine(images.to(self.device, self.dtype, non_blocking=True), with_other=True)

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        """The module's own forward on inputs already on the device and in its dtype (stage ssl's networks)."""
        return self.engine(*inputs, **kwargs)

    def set_group_values(self, key: str, values: list[float | None]) -> None:
        """Set `key` (lr, weight_decay) of every parameter group for the coming optimizer step; None leaves a group.

        The groups are DeepSpeed's optimizer's (its fp32 partitions). Its LR scheduler sets every group's lr again
        after each step, so an lr set here holds for one step: schedules call this before every step."""
        groups = self.engine.optimizer.param_groups
        if len(groups) != len(values):
            raise ValueError(f"{len(values)} values for {len(groups)} parameter groups")
        for group, value in zip(groups, values):
            if value is not None:
                group[key] = value

    def backward_step(self, loss: torch.Tensor) -> None:
        """One micro-step; DeepSpeed applies the optimizer at the accumulation boundary."""
        self.engine.backward(loss)
        self.engine.step()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def group_lrs(self) -> dict[str, float]:
        """The current learning rate of every parameter group, by group name."""
        return {name: float(lr) for name, lr in zip(self.group_names, self.engine.get_lr())}

    @property
    def lr(self) -> float:
        """The base learning rate (a group's lr over its layer-decay scale; group 0 is not the base under decay)."""
        return float(self.engine.get_lr()[0]) / self.group_scales[0]

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Collective: every rank calls it. Writes DeepSpeed state plus our client state under <dir>/<tag>.

        The universal_checkpoint_info entry lets ds_to_universal convert the checkpoint for another world size.
        save_latest=False: DeepSpeed's `latest` would name <tag> before the Checkpointer renames it; it writes its own.
        """
        state = {**client_state, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=state, save_latest=False)

    def load(self, directory: Path, tag: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise ValueError(f"could not load checkpoint {directory}/{tag}")
        if self.config.get("checkpoint", {}).get("load_universal") and self.zero_stage == 3:
            self._repair_zero3_universal_load()
        return client_state or {}

    def _repair_zero3_universal_load(self) -> None:
        """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load (runtime/zero/stage3.py,
        load_hp_checkpoint_state_from_checkpoint_dir_stage3), which make the next steps differ from the run that
        saved: every parameter group gets group 0's hyperparameters (no-decay groups would decay; under layer
        decay every group would take group 0's lr), and every group's Adam state shares ONE `step` tensor, which
        torch's AdamW then increments once per group and step (wrong bias correction). Put back our weight decay
        and each group's scheduled lr, and give each state its own step."""
        inner = self.engine.optimizer.optimizer
        for group, weight_decay, lr in zip(inner.param_groups, self._group_weight_decay, self.scheduler.get_lr()):
            group["weight_decay"], group["lr"] = weight_decay, lr
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


    def fp32_state_dict(self, directory: Path, tag: str) -> dict[str, torch.Tensor]:
        """The fp32 master weights (ZeRO partitions gathered from the saved checkpoint <directory>/<tag>), with
        frozen parameters and buffers at their original fp32 values when this rank kept them."""
        if self.zero_stage == 0:
            weights = self._stage0_masters()
        else:
            weights = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
        if self._fixed is not None:
            weights.update({name: tensor.clone() for name, tensor in self._fixed.items()})
        return weights

    def _stage0_masters(self) -> dict[str, torch.Tensor]:
        weights = {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        groups = getattr(self.engine.optimizer, "fp16_groups", None)
        if groups is None:  # no low-precision wrapper: the module's parameters are the masters
            if self.dtype != torch.float32:
                raise RuntimeError("ZeRO stage 0 under bf16 without DeepSpeed's fp32 master groups")
            return weights
        name_of = {id(p): name for name, p in self.module.named_parameters()}
        for low, master in zip(groups, self.engine.optimizer.fp32_groups):
            for param, fp32 in zip(low, master):
                weights[name_of[id(param)]] = fp32.detach().float().cpu()
        return weights


def saved_weights(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """A saved checkpoint's weights read offline, with no engine or process group: the fp32 masters gathered from
    the ZeRO 1-3 partitions of <directory>/<tag> (as the export reads them), or under ZeRO 0 the module's state,
    which is fp32 only where training was."""
    folder = directory / tag
    if any(folder.glob("*zero_pp_rank_*_optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    weights = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    low = sorted(name for name, tensor in weights.items() if tensor.is_floating_point() and tensor.dtype != torch.float32)
    if low:
        raise ValueError(f"{folder} is a ZeRO stage 0 checkpoint in {weights[low[0]].dtype} ({low[0]}, ...): its fp32 "
                         "masters live in the optimizer's state, not the module's. Read the run's export, or train "
                         "with zero_stage 1-3 to read any checkpoint.")
    return weights


def convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal: a ZeRO checkpoint folder -> its universal form, loadable on any world size."""
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
           "--output_folder", str(target), "--num_extract_workers", workers, "--num_merge_workers", workers]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"converting {source} to a universal checkpoint failed:\n{result.stderr[-3000:]}")


def write_deepspeed_config(path: Path, ds_config: dict[str, Any]) -> None:
    path.write_text(json.dumps(ds_config, indent=2) + "\n")
