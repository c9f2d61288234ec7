"""The training run's typed config: data mix, model, optimiser, DeepSpeed and checkpoint settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loaders.loader import LoaderConfig
from models.config import LoraSettings
from loaders.sampler import MixConfig
from sharding.config import config_file, from_dict, merge, parse_overrides, read_yaml


@dataclass(frozen=True)
class DataConfig:
    mix: str = "sdss=0.33,decals=0.33,hst=0.34"  # survey=ratio, exact in every global batch
    global_batch_size: int = 32  # over all ranks and accumulation micro-steps
    epoch_samples: int | None = None  # set this or epoch_multiplier
    epoch_multiplier: float | None = 3.0  # epoch = min(train samples per survey) * this (the plan's sizing)
    on_exhausted: Literal["repeat", "stop"] = "repeat"
    shuffle_window_shards: int = 4
    loader: LoaderConfig = field(default_factory=lambda: LoaderConfig(backend="torch"))
    val_surveys: list[str] = field(default_factory=list)  # default: the mixed surveys
    val_max_samples: int = 256  # per survey, per validation pass
    val_batch_size: int = 32
    # Share of each mixed survey's training samples kept, by a stable hash of the sample key (the same on any world
    # size; 0.1 keeps a subset of what 0.5 keeps); the sampler mixes the kept ones exactly. Validation is untouched.
    label_fraction: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"data.label_fraction must be in (0, 1], got {self.label_fraction!r}")

    def mix_config(self, seed: int) -> MixConfig:
        return MixConfig(ratios=self.mix, global_batch_size=self.global_batch_size, seed=seed,
                         epoch_samples=self.epoch_samples, epoch_multiplier=self.epoch_multiplier,
                         on_exhausted=self.on_exhausted, shuffle_window_shards=self.shuffle_window_shards)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01  # cosine ends at lr * this
    grad_clip: float = 1.0
    layer_decay: float | None = None  # full stage: lr * decay ** (depth from the top) per backbone layer
    # "torch": torch.optim.AdamW through DeepSpeed's torch_adam (fused=True on CUDA), nothing to compile;
    # "deepspeed_fused": DeepSpeed's FusedAdam, which JIT-compiles a CUDA op (needs nvcc and ninja) on first use.
    implementation: Literal["torch", "deepspeed_fused"] = "torch"


@dataclass(frozen=True)
class TrainConfig:
    stage: Literal["head", "full", "lora"] = "head"
    model: str = "tiny"  # configs/models/<name>.yaml or a path
    model_overrides: list[str] = field(default_factory=list)  # e.g. ["head.dropout=0.2"]
    lora: LoraSettings = field(default_factory=LoraSettings)  # used by stage "lora"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: Literal["mse", "dirichlet"] = "dirichlet"
    zero_stage: int = 2
    # ZeRO-3 keeps parameters smaller than this many elements whole on every rank (None: DeepSpeed's 1e5).
    zero3_param_persistence_threshold: int | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum_steps: int = 1
    max_steps: int = 100
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # How long a rank waits to see a checkpoint that rank 0 published (a shared filesystem can show it late).
    checkpoint_visibility_timeout_s: float = 120.0
    val_every: int = 50
    val_at_start: bool = False  # validate the untrained model first: the baseline the run must beat
    log_every: int = 1
    init_from: str | None = None  # a previous run's export (head stage -> full)
    seed: int = 0
    out_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if min(self.max_steps, self.checkpoint_every, self.val_every, self.log_every, self.grad_accum_steps) < 1:
            raise ValueError("max_steps, checkpoint_every, val_every, log_every and grad_accum_steps must be >= 1")
        if self.checkpoint_visibility_timeout_s <= 0:
            raise ValueError(f"checkpoint_visibility_timeout_s must be > 0, got {self.checkpoint_visibility_timeout_s}")
        if self.zero3_param_persistence_threshold is not None and self.zero3_param_persistence_threshold < 0:
            raise ValueError(f"zero3_param_persistence_threshold must be >= 0, got "
                             f"{self.zero3_param_persistence_threshold}")


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A run YAML (configs/train/*.yaml may `base:` another) plus dotted overrides."""
    path = config_file("train", path)  # a path, or a bare name such as `cpu` for configs/train/cpu.yaml
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        base_path = Path(base) if Path(base).is_file() else config_file("train", base)
        data = merge(read_yaml(base_path), data)
    data = merge(data, parse_overrides(overrides))
    return from_dict(TrainConfig, data, where=str(path))
