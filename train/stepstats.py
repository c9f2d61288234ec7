"""Training-step statistics kept on the device between logging steps and reduced in one collective there.

No per-step host synchronisation: a `loss.item()` or an all-reduce on every micro-batch makes the host wait for
the device and the ranks wait for each other, so the next step cannot be queued while this one runs.

The trade-off for the non-finite-loss check: each micro-batch's loss is tested on the device (no sync), and the
test's result travels with the logging step's reduction. A NaN at step s therefore stops the run at the next
logging or checkpoint step (the loop reduces before every checkpoint), naming step s, its loss and this rank's
keys of that step; the steps in between may have applied non-finite updates, but no checkpoint holds them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from train.runlog import key_lanes, keys_hash


class NonFiniteLoss(RuntimeError):
    pass


class StepStats:
    """Per-step loss (device), survey counts and key lanes (host) of this rank, reduced over ranks on demand."""

    def __init__(self, device: torch.device, rank: int, world_size: int, surveys: list[str]):
        self.device, self.rank, self.world_size, self.surveys = device, rank, world_size, surveys
        self._loss = torch.zeros((), dtype=torch.float64, device=device)  # this rank's share of the step's loss
        self._bad_step = torch.zeros((), dtype=torch.int64, device=device)  # first non-finite step; 0 = none
        self._bad_value = torch.zeros((), dtype=torch.float64, device=device)
        self._keys: dict[int, list[str]] = {}  # this rank's keys of the steps since the last reduction
        self._survey = torch.zeros(0, dtype=torch.int64)  # the last step's survey index per sample

    def start_step(self) -> None:
        self._loss.zero_()

    def add(self, step: int, loss: torch.Tensor) -> None:
        """One micro-batch's share of the global batch loss of `step` (1-based); stays on the device."""
        loss = loss.detach().to(torch.float64)
        self._loss += loss
        first = ~torch.isfinite(loss) & (self._bad_step == 0)
        self._bad_step = torch.where(first, torch.full_like(self._bad_step, step), self._bad_step)
        self._bad_value = torch.where(first, loss, self._bad_value)

    def end_step(self, step: int, keys: list[str], survey: torch.Tensor) -> None:
        """The step's batch on this rank: its keys (for a NaN report and the batch hash) and survey indices."""
        self._keys[step] = list(keys)
        self._survey = survey  # counted (and the keys hashed) only when a logging step reduces

    def reduce(self) -> dict:
        """Collective: the last step's global batch loss (the sum of every rank's shares), survey counts and key hash.

        Raises NonFiniteLoss when any rank saw a non-finite loss since the previous reduction.
        """
        counts = np.bincount(self._survey.cpu().numpy(), minlength=len(self.surveys))
        lanes = key_lanes(self._keys[max(self._keys)]) if self._keys else (0, 0)
        local = torch.cat([self._loss.reshape(1),
                           (self._bad_step > 0).to(torch.float64).reshape(1),
                           torch.tensor([*counts, *lanes], dtype=torch.float64).to(self.device)])
        dist.all_reduce(local)
        values = local.tolist()  # the one host synchronisation
        if values[1] > 0:
            self._raise_non_finite()
        self._keys.clear()
        counts = values[2:2 + len(self.surveys)]
        return {"loss": values[0],
                "survey_counts": {name: int(n) for name, n in zip(self.surveys, counts)},
                "batch_keys_hash": keys_hash((values[-2], values[-1]))}

    def _raise_non_finite(self) -> None:
        never = torch.iinfo(torch.int64).max
        local_step = int(self._bad_step.item()) or never
        first = torch.tensor([local_step], dtype=torch.int64, device=self.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first.item())
        if local_step == step:
            where = f"rank {self.rank} batch keys: {self._keys.get(step, [])}"
            value = float(self._bad_value.item())
        else:
            where, value = "batch keys on another rank", float("nan")
        raise NonFiniteLoss(f"loss is {value} at step {step} ({where}); stopping. Lower optim.lr or check these "
                            "samples' labels.")
