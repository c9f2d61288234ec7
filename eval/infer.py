"""One batch through a morphology model: vote fractions, raw head logits, pooled features, MC dropout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.head import MorphologyModel, fractions


@dataclass
class Outputs:
    fractions: np.ndarray  # (n, F) float32, dropout off (the same with or without MC samples)
    logits: np.ndarray  # (n, F + K) float32 raw head outputs (named answers, then each incomplete question's other)
    embedding: np.ndarray  # (n, D) float32 pooled backbone features
    std: np.ndarray | None = None  # (n, F) float32 spread of the MC dropout passes
    samples: np.ndarray | None = None  # (S, n, F + K) float32 raw logits of each MC pass (keep_samples only)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible; use --device cpu (evaluation needs no GPU)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def has_dropout(module: nn.Module) -> bool:
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()):
        return True
    return any(getattr(m, "drop_prob", 0.0) > 0 for m in module.modules())  # DINOv2's stochastic depth


def check_mc(model: MorphologyModel, mc_samples: int) -> None:
    if mc_samples < 0:
        raise ValueError(f"--mc-samples must be >= 0, got {mc_samples}")
    if mc_samples and not has_dropout(model):
        raise ValueError("--mc-samples needs dropout in the model (head.dropout or the backbone's dropout), and this "
                         "model has none; MC dropout would give zero spread")


@torch.no_grad()
def infer(model: MorphologyModel, images: torch.Tensor, mc_samples: int = 0, seed: int = 0,
          keep_samples: bool = False) -> Outputs:
    """Deterministic forward; with mc_samples, also the spread of that many passes with dropout on, seeded by `seed`
    (and, with keep_samples, each pass's raw logits).

    The fractions stay the deterministic ones, so a prediction with MC samples only adds the spread."""
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device, torch.float32, non_blocking=True)
    pooled = model.embed(images)
    raw = model.head(pooled)
    out = Outputs(fractions(raw, model.layout).float().cpu().numpy(), raw.float().cpu().numpy(),
                  pooled.float().cpu().numpy())
    if mc_samples:
        backbone_dropout = has_dropout(model.backbone)
        samples = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model.train()  # dropout on; the model has no batch statistics to disturb (LayerNorm only)
            try:
                for _ in range(mc_samples):
                    features = model.embed(images) if backbone_dropout else pooled
                    samples.append(model.head(features).float())
            finally:
                model.eval()
        spread = torch.stack([fractions(raw_sample, model.layout) for raw_sample in samples])
        out.std = spread.std(dim=0, correction=1 if mc_samples > 1 else 0).cpu().numpy()
        if keep_samples:
            out.samples = torch.stack(samples).cpu().numpy()
    return out
