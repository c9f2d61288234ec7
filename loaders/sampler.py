"""The mixing shard sampler: one global sample order per (seed, epoch), sliced by rank and loader worker."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any, Literal

import numpy as np

from loaders.pfair import MAX_RATIO_DENOMINATOR, allocate_batches, check_ratios, exact_ratios, max_drift, \
    parse_ratios, slot_positions
from loaders.schedule import MixSchedule, batch_bounds, schedule_allocation, schedule_drift
from loaders.streams import Streams, stream_rows

ShardCounts = Mapping[str, Sequence[int]]
"""Per survey, the sample count of each train shard in manifest order, e.g. {"sdss": [1000, 1000, 412]};
surveys that are not in the mix are ignored."""


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """How surveys are mixed into one global sample order (DESIGN.md, "Mixing")."""

    ratios: dict[str, float] | str
    """Share of every global batch per survey: {"sdss": 0.33, ...} or "sdss=0.33,decals=0.33,hst=0.34".
    Positive, summing to 1 (within 1e-6; used as exact fractions, pfair.exact_ratios); stored as a dict
    whose order is the survey index order."""
    global_batch_size: int
    """Samples per optimizer step over all ranks; must be divisible by the world size."""
    seed: int = 0
    """Seed of every shuffle (>= 0). The order depends only on it, the epoch, the shard counts and this."""
    epoch_samples: int | None = None
    """Epoch size in samples, rounded down to whole global batches. Set this or epoch_multiplier."""
    epoch_multiplier: float | None = None
    """Epoch size = min(train samples per survey) * this (the original plan's comparable sizing),
    rounded down to whole global batches. Set this or epoch_samples."""
    on_exhausted: Literal["repeat", "stop"] = "stop"
    """A survey that runs out within an epoch: "repeat" continues it with a fresh permutation; "stop"
    ends the epoch at the last full global batch before any survey would run out."""
    shuffle_window_shards: int = 4
    """Shards (after the per-epoch shard shuffle) whose samples are shuffled together; a reader needs
    about this many open shards per survey."""
    schedule: MixSchedule | None = None
    """Shares that change with the global step (loaders.schedule). With a schedule, `ratios` only names the
    surveys (the schedule's, in its order) and every allocation follows the schedule, continuing across epochs
    (epoch e holds global batches e * N to (e + 1) * N - 1)."""

    def __post_init__(self) -> None:
        if self.schedule is not None:
            object.__setattr__(self, "ratios", {name: 1.0 for name in self.schedule.names})
            if self.on_exhausted != "repeat":
                raise ValueError("mix: a mix schedule needs on_exhausted='repeat' (an epoch's length must not "
                                 "depend on the shares, which change within it)")
        ratios = parse_ratios(self.ratios) if isinstance(self.ratios, str) else check_ratios(self.ratios)
        object.__setattr__(self, "ratios", ratios)
        _check_int("global_batch_size", self.global_batch_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("shuffle_window_shards", self.shuffle_window_shards, 1)
        if (self.epoch_samples is None) == (self.epoch_multiplier is None):
            raise ValueError("mix: set exactly one of epoch_samples (samples per epoch) or epoch_multiplier "
                             f"(epoch = min(train samples per survey) * N); got epoch_samples="
                             f"{self.epoch_samples!r}, epoch_multiplier={self.epoch_multiplier!r}")
        multiplier = self.epoch_multiplier
        if self.epoch_samples is not None:
            _check_int("epoch_samples", self.epoch_samples, 1)
        elif isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not 0 < multiplier < math.inf:
            raise ValueError(f"mix.epoch_multiplier must be a positive number, got {multiplier!r}")
        if self.on_exhausted not in ("repeat", "stop"):
            raise ValueError(f"mix.on_exhausted must be 'repeat' or 'stop', got {self.on_exhausted!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class EpochOrder:
    """One epoch's global sample order, the same on every rank: row p of `samples` is sample p."""

    survey_names: tuple[str, ...]
    global_batch_size: int
    counts: np.ndarray
    """int64 (num_batches, num_surveys): samples of each survey in each global batch."""
    samples: np.ndarray
    """int64 (num_batches * global_batch_size, 3): (survey index, shard index, index within shard)."""

    @property
    def num_batches(self) -> int:
        return int(self.counts.shape[0])


def epoch_allocation(shard_counts: ShardCounts, mix: MixConfig, epoch: int = 0) -> np.ndarray:
    """Samples per survey in each global batch of an epoch: int64 (num_batches, num_surveys).

    The epoch is a whole number of global batches (so every rank yields as many), sized by
    epoch_samples or epoch_multiplier; under "stop" it is cut to the last batch that no survey's
    running total exceeds its train samples. It draws no random numbers, so every epoch and every
    rank gets the same length. Without a schedule every epoch has the same allocation; with one, epoch
    `epoch` takes the schedule's global batches from epoch * num_batches on.
    """
    available = np.array([int(c.sum()) for c in _shard_arrays(shard_counts, mix)], dtype=np.int64)
    batch_size = mix.global_batch_size
    num_batches = _target_batches(available, mix)
    if mix.schedule is not None:
        first = _check_int("epoch", epoch, 0) * num_batches
        counts = schedule_allocation(mix.schedule, batch_size, first, first + num_batches)
        _refuse_small(mix, available, counts.max(axis=0))
        return counts
    if mix.on_exhausted == "repeat":
        _refuse_small(mix, available, [math.ceil(r * batch_size) for r in exact_ratios(mix.ratios).values()])
        return allocate_batches(mix.ratios, batch_size, num_batches)
    # Drift < 1 means n batches take more than n * B * r - 1 samples of a survey: none lasts past this.
    bound = min(math.floor((int(a) + 1) / (batch_size * r))
                for a, r in zip(available, exact_ratios(mix.ratios).values()))
    counts = allocate_batches(mix.ratios, batch_size, min(num_batches, bound))
    fits = (np.cumsum(counts, axis=0) <= available).all(axis=1)
    num_batches = int(fits.sum())  # running totals only grow, so the batches that fit are a prefix
    if num_batches == 0:
        raise ValueError(f"mix: on_exhausted='stop' leaves no full global batch of {batch_size}: a survey has "
                         f"fewer train samples ({dict(zip(mix.ratios, available.tolist()))}) than its share "
                         "of one batch; lower global_batch_size or use on_exhausted='repeat'")
    return counts[:num_batches]


def _refuse_small(mix: MixConfig, available: np.ndarray, per_batch: Sequence[int]) -> None:
    small = {n: int(a) for n, a, c in zip(mix.ratios, available, per_batch) if a < c}
    if small:
        raise ValueError(f"mix: survey(s) {small} have fewer train samples than their share of one global batch "
                         f"({dict(zip(mix.ratios, (int(c) for c in per_batch)))}): a galaxy would appear twice in "
                         "a batch; lower global_batch_size")


def mix_allocation(mix: MixConfig, start: int, stop: int) -> np.ndarray:
    """Samples per survey in global batches [start, stop) counted from the first epoch's start (for checks and
    inspection): the schedule's, or the constant mix's PD2 allocation, which every epoch repeats from its start."""
    if mix.schedule is not None:
        return schedule_allocation(mix.schedule, mix.global_batch_size, start, stop)
    return allocate_batches(mix.ratios, mix.global_batch_size, stop)[start:]


def epoch_length(shard_counts: ShardCounts, mix: MixConfig) -> tuple[int, np.ndarray]:
    """(global batches per epoch, samples drawn from each survey per epoch), the same on every rank."""
    counts = epoch_allocation(shard_counts, mix)
    return int(counts.shape[0]), counts.sum(axis=0)


def survey_stream(shard_counts: ShardCounts, mix: MixConfig, epoch: int, survey: str,
                  num_samples: int) -> np.ndarray:
    """The first `num_samples` (shard, index) rows of one survey's shuffled stream for an epoch.

    A pass shuffles the survey's shard order, cuts it into windows of shuffle_window_shards shards and
    shuffles the samples within each window; passes after the first (on_exhausted="repeat") are fresh
    permutations. Seeded by (seed, epoch, survey name, pass, window), never by rank or worker.
    """
    if survey not in mix.ratios:
        raise ValueError(f"survey {survey!r} is not in the mix {list(mix.ratios)}")
    streams = _streams(shard_counts, mix, epoch)
    return stream_rows(streams, list(mix.ratios).index(survey), 0, _check_int("num_samples", num_samples, 0), {})


def global_order(shard_counts: ShardCounts, mix: MixConfig, epoch: int) -> EpochOrder:
    """Materialise one epoch's global sample order (for tests, inspection and small runs).

    Batch b takes its survey counts from epoch_allocation and each survey's next samples from its
    stream; within the batch the surveys are interleaved by EPDF (pfair.slot_positions), rotated
    per batch, so every rank's contiguous slice holds each survey's share of the batch within less
    than two samples and, over many batches, each rank sees each survey at its ratio.
    """
    counts = epoch_allocation(shard_counts, mix, epoch)
    streams = _streams(shard_counts, mix, epoch)
    starts = np.cumsum(counts, axis=0) - counts
    surveys, positions = slot_positions(counts, starts, np.arange(len(counts)), slice(0, mix.global_batch_size))
    samples = np.empty((surveys.size, 3), dtype=np.int64)
    samples[:, 0], positions = surveys.reshape(-1), positions.reshape(-1)
    for s in range(len(streams.names)):
        mask = samples[:, 0] == s
        samples[mask, 1:] = stream_rows(streams, s, 0, int(counts[:, s].sum()), {})[positions[mask]]
    return EpochOrder(streams.names, mix.global_batch_size, counts, samples)


def rank_batch_indices(order: EpochOrder, rank: int, world_size: int, batch_index: int) -> slice:
    """Rows of `order.samples` that rank `rank` of `world_size` reads in global batch `batch_index`."""
    slots = _rank_slots(order.global_batch_size, rank, world_size)
    offset = _check_index("batch_index", batch_index, order.num_batches) * order.global_batch_size
    return slice(offset + slots.start, offset + slots.stop)


def iter_rank_batches(shard_counts: ShardCounts, mix: MixConfig, epoch: int, rank: int, world_size: int,
                      worker_id: int = 0, num_workers: int = 1,
                      start_sample: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (global batch index, int64 (B / world_size, 3) rows of (survey, shard, index)) for one worker.

    The rank reads its contiguous slice of every global batch from `start_sample` (samples of the
    epoch already consumed, a multiple of B) on. Worker k of K (K = 0 means in-process, as 1) takes
    the k-th, (k+K)-th, ... of those batches, so a torch DataLoader's round-robin over workers yields
    them in order. Memory stays at about one shuffle window per survey: streams are built lazily.
    """
    batch_size = mix.global_batch_size
    slots = _rank_slots(batch_size, rank, world_size)
    _check_int("num_workers", num_workers, 0)
    num_workers = max(num_workers, 1)
    worker_id = _check_index("worker_id", worker_id, num_workers)
    counts = epoch_allocation(shard_counts, mix, epoch)
    first_batch = _start_batch(start_sample, batch_size, counts.shape[0])
    streams = _streams(shard_counts, mix, epoch)
    batches = range(first_batch + worker_id, counts.shape[0], num_workers)
    return _iter_batches(counts, streams, slots, batches)


class MixingSampler:
    """Where training is in the mixed stream: (epoch, samples consumed), advanced per global batch."""

    def __init__(self, shard_counts: ShardCounts, mix: MixConfig, epoch: int = 0) -> None:
        self.shard_counts = dict(zip(mix.ratios, _shard_arrays(shard_counts, mix)))
        self.mix = mix
        self.num_batches = epoch_length(shard_counts, mix)[0]
        """Global batches per epoch (the same for every epoch)."""
        self.fingerprint = mix_fingerprint(shard_counts, mix)
        self.epoch = _check_int("epoch", epoch, 0)
        self.samples_consumed = 0

    @property
    def batch_index(self) -> int:
        """The next global batch of the current epoch."""
        return self.samples_consumed // self.mix.global_batch_size

    def rank_batches(self, rank: int, world_size: int, worker_id: int = 0,
                     num_workers: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """The rest of the current epoch for one rank's worker, as iter_rank_batches."""
        return iter_rank_batches(self.shard_counts, self.mix, self.epoch, rank, world_size,
                                 worker_id, num_workers, self.samples_consumed)

    def advance(self, num_batches: int = 1) -> None:
        """Record `num_batches` more consumed global batches, rolling over into following epochs."""
        _check_int("num_batches", num_batches, 0)
        epochs, batch = divmod(self.batch_index + num_batches, self.num_batches)
        self.epoch += epochs
        self.samples_consumed = batch * self.mix.global_batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed,
                "global_batch_size": self.mix.global_batch_size, "mix_fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from state_dict(); mid-epoch only with the same batch size, mix and shard counts."""
        epoch = _check_int("state epoch", state.get("epoch"), 0)
        consumed = _check_int("state samples_consumed", state.get("samples_consumed"), 0)
        batch_size = self.mix.global_batch_size
        if consumed:
            if state.get("global_batch_size") != batch_size:
                raise ValueError(f"cannot resume mid-epoch {epoch} with global_batch_size {batch_size}: the state "
                                 f"was saved with {state.get('global_batch_size')!r}; change it only at epoch ends")
            if state.get("mix_fingerprint", self.fingerprint) != self.fingerprint:
                raise ValueError("cannot resume mid-epoch: the ratios, seed, epoch sizing or shard counts "
                                 "differ from those the state was saved with")
            # A fully consumed epoch (never saved by advance(), which rolls over) is the next one's start.
            extra_epochs, batch = divmod(_start_batch(consumed, batch_size, self.num_batches), self.num_batches)
            epoch, consumed = epoch + extra_epochs, batch * batch_size
        self.epoch, self.samples_consumed = epoch, consumed


def mix_fingerprint(shard_counts: ShardCounts, mix: MixConfig) -> str:
    """Short hash of everything but the batch size that the order depends on (to refuse bad resumes)."""
    fields = {**dataclasses.asdict(mix), "global_batch_size": None,
              "ratios": {name: str(r) for name, r in exact_ratios(mix.ratios).items()},
              "schedule": None if mix.schedule is None else mix.schedule.to_json(),
              "shard_counts": {name: [int(c) for c in counts]
                               for name, counts in zip(mix.ratios, _shard_arrays(shard_counts, mix))}}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def mixing_report(order: EpochOrder, mix: MixConfig, epoch: int = 0) -> dict[str, Any]:
    """Per-batch per-survey counts, exact max drift, duplicates and shards per batch, for loaders.inspect.

    With a schedule, the allowed counts are each batch's own floor/ceil and the drift is against the schedule's
    integral from step 0 (epoch `epoch` holds global batches epoch * num_batches on)."""
    num_surveys, batch_size = len(order.survey_names), order.global_batch_size
    batch_of = np.arange(len(order.samples)) // batch_size
    surveys = order.samples[:, 0]
    counts = np.bincount(batch_of * num_surveys + surveys, minlength=order.num_batches * num_surveys)
    counts = counts.reshape(order.num_batches, num_surveys)
    if mix.schedule is not None:
        first = epoch * order.num_batches
        floors, ceils = batch_bounds(mix.schedule, batch_size, first, first + order.num_batches)
        drift = [worst for worst, _ in schedule_drift(mix.schedule, batch_size, counts, first)]
    else:
        shares = [exact_ratios(mix.ratios)[name] for name in order.survey_names]
        floors = np.array([math.floor(batch_size * r) for r in shares])
        ceils = np.array([math.ceil(batch_size * r) for r in shares])
        drift = max_drift(counts, shares)
    num_unique, max_shards = [], []
    for s in range(num_surveys):
        rows = order.samples[surveys == s]
        num_unique.append(len(np.unique(rows[:, 1:], axis=0)))
        pairs = np.unique(np.stack([batch_of[surveys == s], rows[:, 1]], axis=1), axis=0)
        max_shards.append(int(np.bincount(pairs[:, 0]).max()) if len(pairs) else 0)
    num_samples = counts.sum(axis=0)
    return {"survey_names": list(order.survey_names), "num_batches": order.num_batches,
            "global_batch_size": batch_size, "counts": counts,
            "allocation_exact": bool(((counts >= floors) & (counts <= ceils)).all()),
            "max_drift": [float(d) for d in drift], "drift_below_one": all(d < 1 for d in drift),
            "num_samples": num_samples.tolist(), "num_unique": num_unique,
            "num_duplicates": (num_samples - np.array(num_unique)).tolist(),
            "max_shards_per_batch": max_shards}


def _streams(shard_counts: ShardCounts, mix: MixConfig, epoch: int) -> Streams:
    _check_int("epoch", epoch, 0)
    first = epoch * epoch_length(shard_counts, mix)[0] if mix.schedule is not None else 0
    return Streams(tuple(mix.ratios), _shard_arrays(shard_counts, mix), mix.seed, epoch, mix.shuffle_window_shards,
                   functools.partial(_epoch_batches, mix, first))


def _epoch_batches(mix: MixConfig, first: int, num_batches: int) -> np.ndarray:
    """Counts of an epoch's first `num_batches` batches (past its end too: a pass boundary is sought by them)."""
    return mix_allocation(mix, first, first + num_batches)


def _shard_arrays(shard_counts: ShardCounts, mix: MixConfig) -> list[np.ndarray]:
    missing = [name for name in mix.ratios if name not in shard_counts]
    if missing:
        raise ValueError(f"shard_counts: no shards for survey(s) {missing} of the mix; "
                         f"have {sorted(shard_counts)}")
    out = []
    for name in mix.ratios:
        counts = np.asarray(list(shard_counts[name]))
        if counts.ndim != 1 or (counts.size and counts.dtype.kind not in "iu") or (counts < 0).any():
            raise ValueError(f"shard_counts[{name!r}] must be a list of non-negative sample counts per shard")
        if counts.sum() == 0:
            raise ValueError(f"shard_counts[{name!r}]: survey {name!r} has no train samples")
        out.append(counts.astype(np.int64))
    return out


def _target_batches(available: np.ndarray, mix: MixConfig) -> int:
    if mix.epoch_samples is not None:
        num_samples, how = mix.epoch_samples, f"epoch_samples={mix.epoch_samples}"
    else:
        multiplier = Fraction(mix.epoch_multiplier).limit_denominator(MAX_RATIO_DENOMINATOR)
        num_samples = math.floor(int(available.min()) * multiplier)
        how = f"min(train samples per survey)={available.min()} * epoch_multiplier={mix.epoch_multiplier}"
    if num_samples < mix.global_batch_size:
        raise ValueError(f"mix: {how} gives {num_samples} samples per epoch, fewer than one global batch "
                         f"of {mix.global_batch_size}")
    return num_samples // mix.global_batch_size


def _iter_batches(counts: np.ndarray, streams: Streams, slots: slice,
                  batches: range) -> Iterator[tuple[int, np.ndarray]]:
    starts = np.cumsum(counts, axis=0) - counts
    cache: dict = {}
    for b in batches:
        surveys, positions = slot_positions(counts, starts, np.array([b]), slots)
        surveys, positions = surveys[0], positions[0]
        rows = np.empty((len(surveys), 3), dtype=np.int64)
        rows[:, 0] = surveys
        for s in np.unique(surveys):
            mask = surveys == s
            first, last = int(positions[mask][0]), int(positions[mask][-1])
            # A survey fills its slots of a batch in stream order, so a rank's share of it is a run.
            assert last - first + 1 == np.count_nonzero(mask)
            rows[mask, 1:] = stream_rows(streams, int(s), first, last + 1, cache)
        yield b, rows


def _rank_slots(global_batch_size: int, rank: int, world_size: int) -> slice:
    _check_int("world_size", world_size, 1)
    if global_batch_size % world_size:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}: "
                         "every rank must read the same number of samples per batch")
    rank = _check_index("rank", rank, world_size)
    per_rank = global_batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _start_batch(start_sample: int, global_batch_size: int, num_batches: int) -> int:
    _check_int("start_sample", start_sample, 0)
    if start_sample % global_batch_size or start_sample > num_batches * global_batch_size:
        raise ValueError(f"start_sample {start_sample} is not a whole number of global batches of "
                         f"{global_batch_size} within the epoch's {num_batches} batches; resuming needs the "
                         "global batch size the state was saved with")
    return start_sample // global_batch_size


def _check_index(what: str, value: Any, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < size:
        raise ValueError(f"{what} must be an integer in [0, {size}), got {value!r}")
    return int(value)


def _check_int(what: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)
