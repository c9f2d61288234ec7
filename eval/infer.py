"""One batch through a morphology model: vote fractions, raw head logits, pooled features, MC dropout."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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
          keep_samples: bool = False, row_seeds: Sequence[int] | None = None) -> Outputs:
    """Deterministic forward; with mc_samples, also the spread of that many passes with dropout on (and, with
    keep_samples, each pass's raw logits).

    With `row_seeds` (one per image) each galaxy's passes are drawn from its own seed, so its spread does not depend
    on which galaxies share its batch or where it sits in it; without, the batch's passes are drawn from `seed`.
    The fractions stay the deterministic ones, so a prediction with MC samples only adds the spread."""
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device, torch.float32, non_blocking=True)
    pooled = model.embed(images)
    raw = model.head(pooled)
    out = Outputs(fractions(raw, model.layout).float().cpu().numpy(), raw.float().cpu().numpy(),
                  pooled.float().cpu().numpy())
    if mc_samples:
        if row_seeds is not None and len(row_seeds) != len(images):
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {len(images)} images")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.train()  # dropout on; the model has no batch statistics to disturb (LayerNorm only)
            try:
                samples = (_passes_per_row(model, images, pooled, mc_samples, row_seeds) if row_seeds is not None
                           else _passes(model, images, pooled, mc_samples, seed))
            finally:
                model.eval()
        spread = torch.stack([fractions(raw_sample, model.layout) for raw_sample in samples])
        out.std = spread.std(dim=0, correction=1 if mc_samples > 1 else 0).cpu().numpy()
        if keep_samples:
            out.samples = torch.stack(samples).cpu().numpy()
    return out


def _passes(model: MorphologyModel, images: torch.Tensor, pooled: torch.Tensor, mc_samples: int,
            seed: int) -> list[torch.Tensor]:
    backbone_dropout = has_dropout(model.backbone)
    torch.manual_seed(seed)
    return [model.head(model.embed(images) if backbone_dropout else pooled).float() for _ in range(mc_samples)]


def _passes_per_row(model: MorphologyModel, images: torch.Tensor, pooled: torch.Tensor, mc_samples: int,
                    row_seeds: Sequence[int]) -> list[torch.Tensor]:
    """Each galaxy's mc_samples passes as one batch of copies of it, after seeding with its own seed."""
    backbone_dropout = has_dropout(model.backbone)
    per_row = []
    for i, row_seed in enumerate(row_seeds):
        torch.manual_seed(int(row_seed) % 2**63)
        if backbone_dropout:
            features = model.embed(images[i:i + 1].expand(mc_samples, *images.shape[1:]))
        else:
            features = pooled[i:i + 1].expand(mc_samples, -1)
        per_row.append(model.head(features).float())  # (S, F + K)
    if not per_row:
        return [model.head(pooled[:0]).float()] * mc_samples
    return list(torch.stack(per_row, dim=1).unbind(0))


def key_seeds(seed: int, keys: Sequence[str]) -> list[int]:
    """One MC-dropout seed per galaxy from its key (or any stable name): the same wherever the galaxy is read."""
    return [int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") % 2**63 for key in keys]
