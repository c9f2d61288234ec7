"""Training stages (head, full, LoRA, ssl): what trains, the loss, fractions and the final export, via models/."""

from __future__ import annotations

import json
from pathlib import Path
import torch
from safetensors.torch import load_file

from loaders.batch import Batch
from loaders.schedule import schedule_allocation
from models.config import load_model_config
from models.head import MorphologyModel, fractions as head_fractions
from models.io import BACKBONE_DIR, WEIGHTS_FILE, read_export_meta, save_backbone, save_export
from models.lora import apply_lora, is_lora, merge_lora
from models.losses import batch_loss, loss_count
from models.sample_noise import per_sample_noise
from sharding.config import to_dict
from sharding.schema import FeatureSchema
from sharding.writer import sha256_of
from train import checkpoint
from train.config import TrainConfig


def build(cfg: TrainConfig, schema: FeatureSchema) -> tuple[torch.nn.Module, int]:
    """The model for a stage and its backbone depth (for layer-wise LR decay); stage ssl's is the student network
    (backbone + DINO/iBOT heads, models.ssl_arch), its teacher built from it by train.ssl_stage."""
    if cfg.stage == "ssl":
        from models.ssl_continued import build_student
        ssl = cfg.ssl
        config = load_model_config(cfg.model, cfg.model_overrides)
        student = build_student(config, ssl.dino_head, ssl.ibot_head if ssl.ibot_separate_head else None,
                                ssl.continued)
        return student, config.backbone.num_hidden_layers
    model = MorphologyModel(load_model_config(cfg.model, cfg.model_overrides), schema)
    if cfg.init_from:
        meta = read_export_meta(cfg.init_from)
        if meta["output_names"] != model.output_names:
            raise ValueError(f"init_from {cfg.init_from}: its outputs differ from this model's schema")
        model.load_state_dict(load_file(Path(cfg.init_from) / WEIGHTS_FILE), strict=True)
    if cfg.stage == "head":
        model.backbone.requires_grad_(False)
    elif cfg.stage == "lora":
        apply_lora(model, cfg.lora)
    per_sample_noise(model)  # dropout keyed by (seed, step, global position): the same on any world size
    return model, model.config.backbone.num_hidden_layers


def loss_sum(kind: str, raw_logits: torch.Tensor, batch: Batch, model: MorphologyModel) -> torch.Tensor:
    """The loss summed over the batch's labels; the loop divides by the global batch's `label_count`."""
    return batch_loss(kind, raw_logits, batch, model.layout, reduction="sum")


def label_count(kind: str, batch: Batch, model: MorphologyModel) -> torch.Tensor:
    return loss_count(kind, batch, model.layout)


def fractions(raw_logits: torch.Tensor, model: MorphologyModel) -> torch.Tensor:
    return head_fractions(raw_logits, model.layout)


def slice_batch(batch: Batch, part: slice) -> Batch:
    return batch.slice(part)  # multi-crop views included


def provenance(cfg: TrainConfig, step: int, val_results: dict | None = None) -> dict:
    """What evaluation needs to know about a trained model: what it saw, how its inputs were made, how it did.

    The surveys' manifest sha256 pins the exact shards; image size and normalisation let evaluation rebuild the
    input pipeline; the final validation summary and the git commit let a table say where a model came from.
    """
    loader = cfg.data.loader
    mix_config = cfg.data.mix_config(cfg.seed)
    mix, schedule = mix_config.ratios, None
    if mix_config.schedule is not None:  # the shares the run actually drew over its steps, and the schedule itself
        drawn = schedule_allocation(mix_config.schedule, mix_config.global_batch_size, 0, cfg.max_steps).sum(axis=0)
        mix = {n: int(c) / int(drawn.sum()) for n, c in zip(mix_config.schedule.names, drawn) if c}
        schedule = mix_config.schedule.to_json()
    surveys = {}
    for survey in mix:
        manifest = Path(loader.shard_root) / survey / "manifest.json"
        build = json.loads(manifest.read_text()).get("build", {}) if manifest.is_file() else {}
        surveys[survey] = {"manifest": str(manifest), "manifest_sha256": sha256_of(manifest) if build else None,
                           "image_size": build.get("image_size"), "image_format": build.get("image_format")}
    summary = {name: {k: v for k, v in res.items() if k != "features"} for name, res in (val_results or {}).items()}
    # The mix as [survey, share] pairs: JSON objects are written with sorted keys, and the order is the loaders'.
    return {"stage": cfg.stage, "step": step, "loss": cfg.loss, "mix": [[k, float(v)] for k, v in mix.items()],
            "mix_schedule": schedule,
            "surveys": surveys, "input": {"image_size": loader.image_size, "mean": list(loader.mean),
                                          "std": list(loader.std)},
            "val_metrics": summary, "config": to_dict(cfg), "git_commit": checkpoint.git_commit()}


def export(cfg: TrainConfig, schema: FeatureSchema, step: int, state_dict: dict[str, torch.Tensor], folder: Path,
           val_results: dict | None = None) -> Path:
    """<folder> (safetensors + config + schema + provenance, and backbone/) from the run's consolidated fp32 weights.

    The weights go into a freshly built fp32 model of the stage; LoRA adapters are merged there, in fp32.
    """
    model, _ = build(cfg, schema)
    # The state dict has the stage's key names (peft's for LoRA): the backbone/ folder is written from this model.
    model.load_state_dict(state_dict, strict=True)
    if is_lora(model):
        model, state_dict = merge_lora(model), None
    return _save(cfg, model, folder, step, state_dict, val_results)


def initial_export(cfg: TrainConfig, schema: FeatureSchema, folder: Path) -> Path:
    """The run's weights before its first step (seeded as `python -m train` seeds them), exported with step 0.

    The untrained baseline of a study: the same model, inputs and provenance, so evaluation can show what
    training added, with intervals, on the same galaxies.
    """
    torch.manual_seed(cfg.seed)
    model, _ = build(cfg, schema)
    if is_lora(model):
        model = merge_lora(model)
    return _save(cfg, model, folder, 0)


def _save(cfg: TrainConfig, model: MorphologyModel, folder: Path, step: int,
          state_dict: dict[str, torch.Tensor] | None = None, val_results: dict | None = None) -> Path:
    """<folder>/backbone (plain transformers DINOv2 + its image processor), then the export that eval loads.

    export.json is written last: a folder holding it is a finished export (the demo and requeued jobs skip it).
    """
    loader = cfg.data.loader
    save_backbone(model.backbone, Path(folder) / BACKBONE_DIR, image_size=loader.image_size, mean=loader.mean,
                  std=loader.std)
    return save_export(model, folder, state_dict=state_dict, metadata=provenance(cfg, step, val_results))
