"""DeepSpeed ZeRO: config mapping, engine set-up, steps, checkpoints and fp32 export (the only deepspeed importer)."""

from __future__ import annotations

import json
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


def deepspeed_config(cfg: TrainConfig, world_size: int, on_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for a run; written next to the run so it can be inspected and reused."""
    per_step = world_size * cfg.grad_accum_steps
    if cfg.data.global_batch_size % per_step:
        raise ValueError(f"data.global_batch_size={cfg.data.global_batch_size} must be divisible by world size "
                         f"({world_size}) x grad_accum_steps ({cfg.grad_accum_steps})")
    optim = cfg.optim
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero3_param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = cfg.zero3_param_persistence_threshold
    return {
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


def _layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for encoder layer i, num_layers+1 for everything above the encoder."""
    if ".embeddings." in f".{name}":
        return 0
    marker = "encoder.layer."
    if marker in name:
        return int(name.split(marker, 1)[1].split(".", 1)[0]) + 1
    return num_layers + 1


def param_groups(model: torch.nn.Module, cfg: TrainConfig, num_layers: int) -> list[dict[str, Any]]:
    """Trainable parameters grouped by weight decay and (optionally) layer-wise learning-rate decay."""
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    decay = cfg.optim.layer_decay
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)
        depth = _layer_depth(name, num_layers) if decay is not None else num_layers + 1
        scale = decay ** (num_layers + 1 - depth) if decay is not None else 1.0
        group = groups.setdefault((no_decay, depth), {"params": [], "lr": cfg.optim.lr * scale,
                                                     "weight_decay": 0.0 if no_decay else cfg.optim.weight_decay})
        group["params"].append(param)
    if not groups:
        raise ValueError(f"stage {cfg.stage!r} leaves no trainable parameters")
    return list(groups.values())


class Engine:
    """A model wrapped by DeepSpeed: forward, backward+step, checkpoints."""

    def __init__(self, model: torch.nn.Module, groups: list[dict[str, Any]], ds_config: dict[str, Any]):
        self.config = ds_config
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=ds_config)
        self.dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw logits (named answers + the implicit 'other' answers) that the losses need."""
        return self.engine(images.to(self.device, self.dtype), with_other=True)

    def backward_step(self, loss: torch.Tensor) -> None:
        """One micro-step; DeepSpeed applies the optimizer at the accumulation boundary."""
        self.engine.backward(loss)
        self.engine.step()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Collective: every rank calls it. Writes DeepSpeed state plus our client state under <dir>/<tag>."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)

    def load(self, directory: Path, tag: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise ValueError(f"could not load checkpoint {directory}/{tag}")
        return client_state

    def fp32_state_dict(self, directory: Path, tag: str) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights of a saved checkpoint (ZeRO partitions gathered)."""
        if self.config["zero_optimization"]["stage"] == 0:
            return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)


def write_deepspeed_config(path: Path, ds_config: dict[str, Any]) -> None:
    path.write_text(json.dumps(ds_config, indent=2) + "\n")
