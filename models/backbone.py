"""The DINOv2 backbone (transformers' Dinov2Model): random init from a config or weights from a local folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from transformers import Dinov2Config, Dinov2Model

from models.config import BackboneConfig, ModelConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Fields that define the computation: a pretrained folder must agree with the YAML on all of them, or
# the folder is the wrong size, and an export rebuilt from our config would not be the model trained.
ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "patch_size", "image_size",
               "num_channels", "hidden_act", "layer_norm_eps", "qkv_bias", "use_swiglu_ffn")
# Regularisation may differ from the pretraining config: ours wins.
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate")


def dinov2_config(cfg: BackboneConfig) -> Dinov2Config:
    return Dinov2Config(**dataclasses.asdict(cfg))


def count_backbone_params(cfg: BackboneConfig) -> int:
    """Parameters of Dinov2Model for `cfg`, computed analytically (ViT-S/14: 22,056,576; ViT-B/14: 86,580,480)."""
    if cfg.use_swiglu_ffn:
        raise ValueError("count_backbone_params does not model the SwiGLU feed-forward")
    h, c, p = cfg.hidden_size, cfg.num_channels, cfg.patch_size
    num_positions = (cfg.image_size // p) ** 2 + 1
    embeddings = c * p * p * h + h + 2 * h + num_positions * h  # patch proj, cls + mask tokens, positions
    attention = 4 * (h * h + h) if cfg.qkv_bias else 3 * h * h + h * h + h
    mlp = h * cfg.intermediate_size + cfg.intermediate_size + cfg.intermediate_size * h + h
    layer = 2 * (2 * h) + attention + mlp + 2 * h  # two LayerNorms, two layer scales
    return embeddings + cfg.num_hidden_layers * layer + 2 * h


def check_pretrained_folder(path: str | Path) -> Path:
    """The folder as a Path, or a ValueError saying why it is not a DINOv2 save_pretrained folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ValueError(f"pretrained folder {folder} does not exist; expected a local folder written by "
                         f"Dinov2Model.save_pretrained (config.json + model.safetensors)")
    if not folder.is_dir():
        raise ValueError(f"pretrained path {folder} is a file, not a save_pretrained folder")
    contents = sorted(p.name for p in folder.iterdir())
    if "config.json" not in contents or not any(w in contents for w in WEIGHT_FILES):
        raise ValueError(f"pretrained folder {folder} is not in save_pretrained layout: it needs config.json and "
                         f"one of {list(WEIGHT_FILES)}, it holds {contents[:20]}")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{folder / 'config.json'} is not a JSON object: {err}") from None
    if model_type != "dinov2":
        raise ValueError(f"pretrained folder {folder} holds a {model_type!r} model, not 'dinov2'")
    return folder


def load_pretrained(path: str | Path, cfg: BackboneConfig) -> Dinov2Model:
    """Dinov2Model weights from a local save_pretrained folder; the folder's shapes must match `cfg`."""
    folder = check_pretrained_folder(path)
    found = Dinov2Config.from_pretrained(folder, local_files_only=True)
    mismatched = {f: (getattr(found, f), getattr(cfg, f)) for f in ARCH_FIELDS if getattr(found, f) != getattr(cfg, f)}
    if mismatched:
        detail = ", ".join(f"{f}: folder {a} vs config {b}" for f, (a, b) in mismatched.items())
        raise ValueError(f"pretrained folder {folder} does not match the model config ({detail}); "
                         f"choose the configs/models YAML of the folder's size")
    dropout = {f: getattr(cfg, f) for f in DROPOUT_FIELDS}
    model, info = Dinov2Model.from_pretrained(folder, local_files_only=True, output_loading_info=True, **dropout)
    # from_pretrained fills missing tensors with random values and only logs it: a silent half-random model.
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(f"pretrained folder {folder} lacks backbone weights: "
                         f"missing {sorted(info['missing_keys'])[:10]}, "
                         f"mismatched {list(info['mismatched_keys'])[:10]}")
    return model


def build_backbone(cfg: ModelConfig) -> Dinov2Model:
    """The backbone: weights from `cfg.pretrained` when set, else randomly initialised (the caller seeds)."""
    if cfg.pretrained:
        return load_pretrained(cfg.pretrained, cfg.backbone)
    return Dinov2Model(dinov2_config(cfg.backbone))


def pool_tokens(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """(N, 1 + P, D) final-layer tokens to (N, D) or (N, 2D) features."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return hidden[:, 1:].mean(dim=1)
    if pooling == "cls_mean":
        return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1)
    raise ValueError(f"unknown pooling {pooling!r}; expected cls_mean, cls or mean")


def pooled_size(cfg: ModelConfig) -> int:
    return 2 * cfg.backbone.hidden_size if cfg.pooling == "cls_mean" else cfg.backbone.hidden_size
