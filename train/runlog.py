"""Rank 0's run log: one JSON line per step (log.jsonl), TensorBoard scalars and a progress bar."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm


LANE_BITS = 26  # a lane sums < 2**27 keys of 26 bits exactly in float64 (what the step reduction carries)


def key_lanes(keys: list[str]) -> tuple[int, int]:
    """Two sums of per-key hash bits: ranks add their lanes, and any split of a batch adds up to the same lanes."""
    a = b = 0
    for key in keys:
        value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        a += value & ((1 << LANE_BITS) - 1)
        b += (value >> LANE_BITS) & ((1 << LANE_BITS) - 1)
    return a, b


def keys_hash(lanes: tuple[int, int]) -> str:
    """A short hash of a global batch's keys (as a set, whatever the world size) from its summed key_lanes, so
    two runs can be compared step by step."""
    return hashlib.sha256(f"{int(lanes[0])}:{int(lanes[1])}".encode()).hexdigest()[:16]


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
        for name in ("loss", "lr", "img_per_s", "data_wait_fraction", "grad_norm", "dann_loss", "dann_acc",
                     "dann_lambda"):
            value = record.get(name)
            if self._tb is not None and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"train/{name}", value, record["step"])
        if self._tb is not None:
            for group, value in record.get("lr_groups", {}).items():
                self._tb.add_scalar(f"lr/{group}", value, record["step"])
            for name, value in record.get("ssl", {}).items():  # stage ssl: collapse monitors, loss terms, schedules
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"ssl/{name}", float(value), record["step"])
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
