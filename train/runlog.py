"""Rank 0's run log: one JSON line per step (log.jsonl), TensorBoard scalars (and, with tracking.mlflow, the same
scalars and the export in MLflow) and a progress bar."""

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


STEP_SCALARS = ("loss", "lr", "img_per_s", "data_wait_fraction", "grad_norm", "dann_loss", "dann_acc", "dann_lambda")


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A step record's scalars under their TensorBoard names (MLflow gets the same names)."""
    out = {}
    for name in STEP_SCALARS:
        value = record.get(name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"train/{name}"] = float(value)
    for group, value in record.get("lr_groups", {}).items():
        out[f"lr/{group}"] = float(value)
    for name, value in record.get("ssl", {}).items():  # stage ssl: collapse monitors, loss terms, schedules
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"ssl/{name}"] = float(value)
    return out


def validation_scalars(record: dict[str, Any]) -> dict[str, float]:
    return {f"val/{survey}/{name}": float(values[name]) for survey, values in record["surveys"].items()
            for name in ("loss", "mae", "r") if math.isfinite(values[name])}


def keys_hash(lanes: tuple[int, int]) -> str:
    """A short hash of a global batch's keys (as a set, whatever the world size) from its summed key_lanes, so
    two runs can be compared step by step."""
    return hashlib.sha256(f"{int(lanes[0])}:{int(lanes[1])}".encode()).hexdigest()[:16]


class RunLog:
    """Appends to log.jsonl (resumed runs continue the same file), TensorBoard and an optional MLflow run
    (train.mlflow_tracking.MlflowTracker: its scalars, the export's artifacts, its end); no-op off rank 0."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, first_step: int, progress: bool = True,
                 tracker=None):
        self.enabled = enabled
        self.tracker = tracker if enabled else None
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
        self._scalars(record["step"], step_scalars(record))
        self._bar.update(record["step"] - self._bar.n)
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")

    def event(self, record: dict[str, Any]) -> None:
        """Validation results, checkpoints, pre-emption: also one JSON line each."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if record.get("event") == "validation":
            self._scalars(record["step"], validation_scalars(record))
        if record.get("event") == "export" and self.tracker is not None:
            self.tracker.log_export(Path(record["path"]))

    def _scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
        if self.tracker is not None:
            self.tracker.log_scalars(step, scalars)

    def write(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            if self.tracker is not None:
                self.tracker.close()
