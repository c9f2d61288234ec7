"""What stage ssl saves besides DeepSpeed's state: the teacher in checkpoints, the teacher backbone in the export.

The teacher (its averaged parameters and the DINO and iBOT centres) is the same on every rank, so rank 0 writes it
beside DeepSpeed's files in the checkpoint folder, and every rank reads it back, on any world size: a universal
load (another world size) reads it from the original folder next to the converted one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.io import BACKBONE_DIR, save_backbone
from models.ssl_arch import SSLTeacher
from train import checkpoint, stages
from train.config import TrainConfig
from train.world import World

TEACHER_FILE = "ssl_teacher.safetensors"
HEADS_FILE = "ssl_heads.safetensors"
EXPORT_META = "ssl_export.json"


class TeacherCheckpoint:
    """A CheckpointEngine (train.checkpoint) that saves and loads the teacher with the engine's state."""

    def __init__(self, engine: Any, teacher: SSLTeacher, world: World):
        self.engine, self.teacher, self.world = engine, teacher, world

    def save(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        self.engine.save(directory, tag, client_state)
        if self.world.is_main:  # inside the partial folder: published (renamed) with the rest, or not at all
            save_file(self.teacher.saved_state(), str(Path(directory) / tag / TEACHER_FILE))

    def load(self, directory: Path, tag: str) -> dict[str, Any]:
        client = self.engine.load(directory, tag)
        source = tag.removesuffix(checkpoint.UNIVERSAL_SUFFIX)  # the universal form holds DeepSpeed's files only
        path = Path(directory) / source / TEACHER_FILE
        if not path.is_file():
            raise ValueError(f"checkpoint {Path(directory) / source} has no {TEACHER_FILE}: it was not written by "
                             f"stage ssl, or was cut short; resume another checkpoint or start a new out_dir")
        device = next(self.teacher.parameters()).device
        self.teacher.load_saved_state(load_file(str(path), device=str(device)))
        return client


def plain_backbone(teacher: SSLTeacher) -> torch.nn.Module:
    """The teacher's backbone as a plain Dinov2Model (continued pretraining's LoRA merged into a copy)."""
    backbone = teacher.network.backbone
    if hasattr(backbone, "merge_and_unload"):
        backbone = copy.deepcopy(backbone).merge_and_unload()
    return backbone


def export_teacher(cfg: TrainConfig, teacher: SSLTeacher, folder: Path, step: int, results: dict) -> Path:
    """Rank 0: <folder>/backbone (the teacher as a plain transformers DINOv2 + preprocessor_config.json, what a
    head/full/lora stage starts from with model_overrides=[pretrained=<folder>/backbone]), the teacher's heads,
    and ssl_export.json (provenance and the last kNN probe), written last: a folder holding it is finished."""
    folder = Path(folder)
    loader, views = cfg.data.loader, cfg.data.loader.views
    save_backbone(plain_backbone(teacher), folder / BACKBONE_DIR, image_size=views.global_crops.size,
                  mean=loader.mean, std=loader.std)
    heads = {name: t for name, t in teacher.network.state_dict().items() if not name.startswith("backbone.")}
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in heads.items()},
              str(folder / HEADS_FILE))
    meta = stages.provenance(cfg, step, results)
    meta["backbone"] = {"path": BACKBONE_DIR, "source": "teacher (EMA of the student)",
                        "image_size": views.global_crops.size}
    (folder / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return folder
