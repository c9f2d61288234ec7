"""Rank 0's run log: one JSON line per step (log.jsonl), TensorBoard scalars and a progress bar."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm


def keys_hash(keys_by_rank: list[list[str]]) -> str:
    """A short hash of a step's global batch keys in rank order, so two runs can be compared step by step."""
    digest = hashlib.sha256()
    for keys in keys_by_rank:
        for key in keys:
            digest.update(key.encode() + b"\n")
    return digest.hexdigest()[:16]


class RunLog:
    """Appends to log.jsonl (resumed runs continue the same file) and TensorBoard; no-op off rank 0."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, first_step: int, progress: bool = True):
        self.enabled = enabled
        self._file = open(Path(out_dir) / "log.jsonl", "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional; log.jsonl has everything
                self._tb = None
        self._bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                         disable=not (enabled and progress))

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name in ("loss", "lr", "img_per_s", "data_wait_fraction", "grad_norm"):
            value = record.get(name)
            if self._tb is not None and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"train/{name}", value, record["step"])
        self._bar.update(record["step"] - self._bar.n)
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")

    def event(self, record: dict[str, Any]) -> None:
        """Validation results, checkpoints, pre-emption: also one JSON line each."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and record.get("event") == "validation":
            for survey, values in record["surveys"].items():
                for name in ("loss", "mae", "r"):
                    if math.isfinite(values[name]):
                        self._tb.add_scalar(f"val/{survey}/{name}", values[name], record["step"])

    def write(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._file.close()
            if self._tb is not None:
                self._tb.close()
