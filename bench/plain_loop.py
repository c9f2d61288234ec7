"""The reference for bench/learning.py: a plain PyTorch loop that uses no project code beyond the shard files.

It reads the built shards with tarfile + PIL + pyarrow, decodes every image once to a small square, and trains a
tiny transformers Dinov2Model with sigmoid outputs and masked MSE on vote fractions (AdamW, cosine over the wall
budget, 90-degree rotations and flips, per-channel normalisation measured on the training images). What the
project's pipeline reaches in the same wall time should not be far below what this reaches.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn
from transformers import Dinov2Config, Dinov2Model


@dataclass(frozen=True)
class PlainConfig:
    image_size: int = 64
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    patch_size: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.03
    seed: int = 0
    threads: int = 2


@dataclass
class SplitData:
    """One survey's split, decoded: images (N, S, S, 3) uint8, labels (N, F) float32 with NaN where absent."""
    survey: str
    keys: list[str]
    images: np.ndarray
    labels: np.ndarray


def feature_names(survey_dir: Path) -> list[str]:
    return json.loads((survey_dir / "manifest.json").read_text())["feature_schema"]["features"]


def read_split(survey_dir: Path, split: str, image_size: int) -> SplitData:
    """Every sample of `split` in shard order, decoded and resized with PIL's antialiased bilinear filter."""
    names = feature_names(survey_dir)
    table = pq.read_table(survey_dir / "labels.parquet", columns=["key", *names]).to_pandas().set_index("key")
    keys, images = [], []
    for tar_path in sorted(survey_dir.glob(f"{survey_dir.name}-{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext not in ("jpg", "jpeg", "png"):
                    continue
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                    image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                    images.append(np.asarray(image))
                keys.append(key)
    labels = table.loc[keys, names].to_numpy(np.float32)
    return SplitData(survey_dir.name, keys, np.stack(images), labels)


class PlainModel(nn.Module):
    def __init__(self, cfg: PlainConfig, num_outputs: int):
        super().__init__()
        self.backbone = Dinov2Model(Dinov2Config(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            patch_size=cfg.patch_size, image_size=cfg.image_size, mlp_ratio=4))
        self.head = nn.Linear(2 * cfg.hidden_size, num_outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(pixel_values=images).last_hidden_state
        pooled = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)
        return torch.sigmoid(self.head(pooled))


def _to_tensor(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def _augment(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A random 90-degree rotation and horizontal flip per image: exact, no resampling."""
    out = []
    for image, k, flip in zip(images, rng.integers(0, 4, len(images)), rng.random(len(images)) < 0.5):
        image = torch.rot90(image, int(k), dims=(1, 2))
        out.append(image.flip(2) if flip else image)
    return torch.stack(out)


def _lr_factor(progress: float, warmup: float) -> float:
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train(train_sets: list[SplitData], budget_s: float, cfg: PlainConfig) -> tuple[PlainModel, dict]:
    """Train until `budget_s` seconds of training have passed; the cosine schedule runs on elapsed time."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    images = np.concatenate([s.images for s in train_sets])
    labels = torch.from_numpy(np.concatenate([s.labels for s in train_sets]))
    mask = torch.isfinite(labels)
    labels = torch.nan_to_num(labels)
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    mean = torch.tensor(pixels.mean(0), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pixels.std(0), dtype=torch.float32).view(1, 3, 1, 1)
    model = PlainModel(cfg, labels.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    started, steps, losses = time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - started) < budget_s:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(elapsed / budget_s, cfg.warmup_fraction)
        index = rng.integers(0, len(images), cfg.batch_size)
        batch = _augment(_to_tensor(images[index], mean, std), rng)
        pred = model(batch)
        m = mask[index]
        loss = ((pred - labels[index]) ** 2 * m).sum() / m.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        losses.append(loss.item())
    model.eval()
    info = {"steps": steps, "train_seconds": time.perf_counter() - started, "final_loss": float(np.mean(losses[-20:])),
            "mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    model.normalisation = (mean, std)
    return model, info


@torch.no_grad()
def predict(model: PlainModel, data: SplitData, batch_size: int = 128) -> np.ndarray:
    mean, std = model.normalisation
    parts = [model(_to_tensor(data.images[i:i + batch_size], mean, std)).numpy()
             for i in range(0, len(data.images), batch_size)]
    return np.concatenate(parts)
