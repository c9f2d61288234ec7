"""The training run's typed config: data mix, model, optimiser, DeepSpeed and checkpoint settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loaders.loader import LoaderConfig
from models.config import LoraSettings
from models.dann import DANNConfig
from models.ssl_continued import ContinuedPretraining
from models.ssl_heads import DINOHeadConfig
from models.ssl_masks import MaskConfig
from loaders.sampler import MixConfig
from loaders.schedule import schedule_from_phases
from sharding.config import config_file, from_dict, merge, parse_overrides, read_yaml


@dataclass(frozen=True)
class MixPhase:
    """One phase of data.mix_schedule: its weights (normalised like `mix`) and the step it ends at (none: the last)."""
    mix: str
    until_step: int | None = None


@dataclass(frozen=True)
class DataConfig:
    mix: str = "sdss=0.33,decals=0.33,hst=0.34"  # survey=ratio, exact in every global batch
    # Shares that change with the step, e.g. [{until_step: 2000, mix: "hst=2.5,sdss=1,decals=1.1"},
    # {mix: "sdss=1,decals=1,hst=1"}]; replaces `mix` when given. Every batch is floor/ceil of its phase's shares and
    # the running totals stay within one sample of the schedule's integral (loaders/schedule.py).
    mix_schedule: list[MixPhase] = field(default_factory=list)
    mix_interpolation: Literal["step", "linear"] = "step"  # linear: shares move from one phase's to the next's
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
    # Files of sample keys (picks.parquet from `python -m eval select`, a CSV/Parquet key column, or one key per line):
    # a mixed survey with a listed key trains on its listed samples only; surveys with none listed are untouched.
    include_keys: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"data.label_fraction must be in (0, 1], got {self.label_fraction!r}")

    def mix_config(self, seed: int) -> MixConfig:
        schedule = None
        if self.mix_schedule:
            phases = [{"mix": p.mix, **({} if p.until_step is None else {"until_step": p.until_step})}
                      for p in self.mix_schedule]
            schedule = schedule_from_phases(phases, self.mix_interpolation)
        return MixConfig(ratios=self.mix, global_batch_size=self.global_batch_size, seed=seed,
                         epoch_samples=self.epoch_samples, epoch_multiplier=self.epoch_multiplier,
                         on_exhausted=self.on_exhausted, shuffle_window_shards=self.shuffle_window_shards,
                         schedule=schedule)


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
class SSLConfig:
    """Stage `ssl` (DINO + iBOT + KoLeo, train/ssl_stage.py). Defaults are DINOv2's
    (dinov2/configs/ssl_default_config.yaml); fractions stand for its epochs of a 100-epoch run.
    configs/train/ssl*.yaml say what they scale and why."""
    dino_head: DINOHeadConfig = field(default_factory=DINOHeadConfig)
    ibot_separate_head: bool = False  # DINOv2's default shares the DINO head
    ibot_head: DINOHeadConfig = field(default_factory=DINOHeadConfig)  # used when separate
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    # KoLeo's nearest neighbours are sought within fixed groups of the global batch (DINOv2: a GPU's batch of 64),
    # so the loss does not change with the world size; every rank's micro-batch must be a multiple of it.
    koleo_group_size: int = 64
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup_fraction: float = 0.3  # DINOv2: 30 of 100 epochs
    centering: Literal["centering", "sinkhorn_knopp", "none"] = "centering"  # none: only as a negative control
    centre_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    momentum_teacher: float = 0.992  # cosine to final_momentum_teacher over max_steps
    final_momentum_teacher: float = 1.0
    weight_decay_end: float = 0.4  # cosine from optim.weight_decay (DINOv2: 0.04)
    freeze_last_layer_fraction: float = 0.01  # DINOv2: 1 of 100 epochs
    patch_embed_lr_mult: float = 0.2  # layer-wise decay: optim.layer_decay (DINOv2: 0.9)
    masks: MaskConfig = field(default_factory=MaskConfig)
    monitor_every: int = 500  # steps between kNN probes of the teacher on the labelled val splits
    knn_k: int = 20
    continued: ContinuedPretraining = field(default_factory=ContinuedPretraining)

    def __post_init__(self):
        if min(self.student_temp, self.teacher_temp, self.warmup_teacher_temp) <= 0:
            raise ValueError("ssl temperatures must be > 0")
        for name in ("teacher_temp_warmup_fraction", "freeze_last_layer_fraction", "centre_momentum",
                     "momentum_teacher", "final_momentum_teacher"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ssl.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.koleo_group_size < 2 or self.monitor_every < 1 or self.knn_k < 1 or self.sinkhorn_iterations < 1:
            raise ValueError("ssl.koleo_group_size >= 2, ssl.monitor_every >= 1, ssl.knn_k >= 1 and "
                             "ssl.sinkhorn_iterations >= 1 are required")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking beside log.jsonl and TensorBoard (train/mlflow_tracking.py; needs the `serve` extra)."""
    mlflow: bool = False  # params (the resolved config), per-step scalars, validation, the export as artifacts
    experiment: str | None = None  # default: the run folder's name
    uri: str | None = None  # default: MLFLOW_TRACKING_URI (MLflow reads it), else sqlite:///runs/mlflow.db


@dataclass(frozen=True)
class TrainConfig:
    stage: Literal["head", "full", "lora", "ssl"] = "head"
    model: str = "tiny"  # configs/models/<name>.yaml or a path
    model_overrides: list[str] = field(default_factory=list)  # e.g. ["head.dropout=0.2"]
    lora: LoraSettings = field(default_factory=LoraSettings)  # used by stage "lora"
    ssl: SSLConfig = field(default_factory=SSLConfig)  # used by stage "ssl"
    dann: DANNConfig = field(default_factory=DANNConfig)  # domain-adversarial training (models/dann.py)
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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if min(self.max_steps, self.checkpoint_every, self.val_every, self.log_every, self.grad_accum_steps) < 1:
            raise ValueError("max_steps, checkpoint_every, val_every, log_every and grad_accum_steps must be >= 1")
        if self.checkpoint_visibility_timeout_s <= 0:
            raise ValueError(f"checkpoint_visibility_timeout_s must be > 0, got {self.checkpoint_visibility_timeout_s}")
        if self.stage == "ssl" and not self.data.loader.views.enabled:
            raise ValueError("stage 'ssl' trains on multi-crop views: set data.loader.views.enabled=true (crop counts, "
                             "sizes and scales under data.loader.views.global_crops / local_crops)")
        if self.stage == "ssl" and self.zero_stage == 3:
            raise ValueError("stage 'ssl' keeps its teacher, an fp32 copy of the student, whole on every rank outside "
                             "DeepSpeed; ZeRO-3 would partition the student only, and every EMA step would gather "
                             "it. Use zero_stage=2 (optimizer states and gradients partitioned) or 1")
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
