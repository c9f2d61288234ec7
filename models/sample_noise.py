"""Dropout and stochastic depth drawn per sample from (seed, step, global position), not from a rank's RNG.

A rank's torch RNG makes a galaxy's dropout mask depend on which rank it landed on and how many galaxies came
before it there, so the loss of a global batch would change with the world size and gradient accumulation. Here
every mask element is a counter-based hash of the sample's seed (`sample_seeds`), the module and the element's
index: the same galaxy at the same step gets the same mask whether the batch is split over 1 or 64 ranks, on any
number of micro-batches. Integer arithmetic on int64 tensors (kept below 2**49, so nothing overflows) runs on any
device; CPU and CUDA give the same masks.

`per_sample_noise(model)` swaps a model's nn.Dropout modules (backbone, head, LoRA) and DINOv2's DropPath for the
keyed versions; `sample_noise(model, seeds)` sets the seeds for one forward pass. Outside that context the
modules are ordinary dropout (MC dropout at evaluation draws from the torch RNG as before).
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF
_UNIT = float(2 ** 32)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), in two 16-bit halves so no int64 product overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (Chris Wellons' lowbias32) on int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_seeds(seed: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) int64 seeds of the samples at `positions` (their index in the global batch) of training step `step`."""
    head = mix32(torch.tensor([seed & _MASK32], dtype=torch.int64))
    head = mix32(head ^ (step & _MASK32))
    return mix32(head ^ (positions.to(torch.int64) & _MASK32))


def random_bits(seeds: torch.Tensor, salt: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(N, *shape) int64 uniform on [0, 2**32): element j of sample i is hash(seeds[i], salt, j)."""
    base = mix32(seeds.to(device) ^ (salt & _MASK32))
    count = 1
    for size in shape:
        count *= size
    index = mix32(torch.arange(count, dtype=torch.int64, device=device))
    return mix32(base[:, None] ^ index[None, :]).reshape(len(seeds), *shape)


def keep_mask(bits: torch.Tensor, drop_probability: float) -> torch.Tensor:
    """True where a uniform 32-bit draw survives dropout with `drop_probability`."""
    return bits >= int(round(drop_probability * _UNIT))


class _Keyed:
    """The seeds of the forward pass in progress (None outside `sample_noise`), a salt and a call counter, so that a
    module called twice in one pass (DINOv2 applies one DropPath to both residual branches) draws two masks."""

    seeds: torch.Tensor | None = None
    salt: int = 0
    calls: int = 0

    def _keep(self, x: torch.Tensor, shape: tuple[int, ...], drop_probability: float) -> torch.Tensor:
        assert self.seeds is not None and len(self.seeds) == x.shape[0], "seeds must match the batch"
        salt = int(mix32(torch.tensor([(self.salt * 4099 + self.calls) & _MASK32], dtype=torch.int64)))
        self.calls += 1
        return keep_mask(random_bits(self.seeds, salt, shape, x.device), drop_probability)


class SampleDropout(nn.Dropout, _Keyed):
    """nn.Dropout whose mask is keyed per sample while seeds are set (still an nn.Dropout for MC dropout checks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.seeds is None:
            return super().forward(x)
        keep = self._keep(x, tuple(x.shape[1:]), self.p)
        return x * keep.to(x.dtype) / (1.0 - self.p)


class SampleDropPath(nn.Module, _Keyed):
    """Stochastic depth: a whole residual branch dropped per sample, keyed like SampleDropout."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        if self.seeds is None:
            keep = torch.rand(x.shape[0], device=x.device) >= self.drop_prob
        else:
            keep = self._keep(x, (), self.drop_prob)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * keep.to(x.dtype).reshape(shape) / (1.0 - self.drop_prob)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


def _is_drop_path(module: nn.Module) -> bool:
    # transformers' Dinov2DropPath (and timm's DropPath) keep their rate in drop_prob.
    return type(module).__name__.endswith("DropPath") and hasattr(module, "drop_prob")


def per_sample_noise(model: nn.Module) -> nn.Module:
    """Swap every dropout and drop-path module of `model` (in place) for its per-sample keyed version.

    Refuses functional randomness it cannot key: attention-probability dropout happens inside transformers'
    attention function, from the global RNG.
    """
    config = getattr(getattr(model, "config", None), "backbone", None)
    if config is not None and getattr(config, "attention_probs_dropout_prob", 0.0) > 0:
        raise ValueError("backbone.attention_probs_dropout_prob > 0 draws attention dropout from each rank's RNG "
                         "inside transformers' attention, so the loss would depend on the world size; set it to 0 "
                         "and regularise with backbone.hidden_dropout_prob, backbone.drop_path_rate or head.dropout")
    for salt, (name, module) in enumerate(list(model.named_modules())):
        if isinstance(module, _Keyed):
            continue
        if isinstance(module, nn.Dropout):
            replacement: nn.Module = SampleDropout(module.p)
        elif _is_drop_path(module):
            replacement = SampleDropPath(float(module.drop_prob))
        else:
            continue
        replacement.salt = salt
        replacement.train(module.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[child] = replacement
    return model


@contextmanager
def sample_noise(model: nn.Module, seeds: torch.Tensor) -> Iterator[None]:
    """One forward pass of `model` with its keyed modules drawing from `seeds` (N,), one per sample."""
    keyed = [m for m in model.modules() if isinstance(m, _Keyed)]
    for module in keyed:
        module.seeds, module.calls = seeds, 0
    try:
        yield
    finally:
        for module in keyed:
            module.seeds = None
