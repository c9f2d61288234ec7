"""The DINO head of self-supervised training: an MLP to a bottleneck, L2 normalisation, weight-normed prototypes.

As dinov2's layers/dino_head.py: Linear-GELU layers (truncated-normal init, std 0.02) to a bottleneck, the
bottleneck L2-normalised, then a bias-free linear layer onto K prototypes whose weight is `g * v / |v|` per
prototype with g initialised to 1. Its outputs are the logits of a K-way soft assignment; the DINO and iBOT losses
compare teacher and student assignments. The weight norm is written out (no torch.nn.utils parametrisation) so
that the state dict holds two plain tensors, `last_layer.weight_g` and `last_layer.weight_v`, that DeepSpeed
partitions and the EMA averages like any other parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

LAST_LAYER = "last_layer."  # parameter names containing this are frozen for the first steps (ssl schedules)


@dataclass(frozen=True)
class DINOHeadConfig:
    """DINOv2's defaults (ssl_default_config.yaml, dino.head_*): 65,536 prototypes, MLP 2048, bottleneck 256."""
    num_prototypes: int = 65536
    hidden_size: int = 2048
    bottleneck_size: int = 256
    num_layers: int = 3

    def __post_init__(self):
        for name in ("num_prototypes", "hidden_size", "bottleneck_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"DINO head {name} must be >= 1, got {getattr(self, name)}")
        if self.num_prototypes < 2:
            raise ValueError("a DINO head needs at least 2 prototypes")


class WeightNormedLinear(nn.Module):
    """y = x (g * v / |v|)^T without bias: each prototype row has length g (initialised to 1)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=5 ** 0.5)  # nn.Linear's own init, as weight_norm(nn.Linear)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


def _mlp(in_features: int, cfg: DINOHeadConfig) -> nn.Module:
    if cfg.num_layers == 1:
        return nn.Linear(in_features, cfg.bottleneck_size)
    layers: list[nn.Module] = [nn.Linear(in_features, cfg.hidden_size), nn.GELU()]
    for _ in range(cfg.num_layers - 2):
        layers += [nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU()]
    layers.append(nn.Linear(cfg.hidden_size, cfg.bottleneck_size))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """(M, D) tokens -> (M, K) prototype logits, each in [-g, g] (a cosine times the prototype's length)."""

    def __init__(self, in_features: int, cfg: DINOHeadConfig):
        super().__init__()
        self.config = cfg
        self.mlp = _mlp(in_features, cfg)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormedLinear(cfg.bottleneck_size, cfg.num_prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12)
        return self.last_layer(x)
