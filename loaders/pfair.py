"""Survey ratios as exact fractions, apportioned Pfair: PD2 across batches, EPDF within a batch."""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

MAX_RATIO_DENOMINATOR = 10**6
"""Float ratios are read as the nearest fraction with at most this denominator (0.33 -> 33/100, 1/3 -> 1/3)."""

RATIO_SUM_TOLERANCE = 1e-6


def check_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    """Validate survey weights (non-empty, positive, finite) and return them normalised to shares summing to 1.

    Any positive weights work: 'sdss=33,decals=33,hst=34', '1,1,1' style or shares that already sum to 1.
    """
    if not ratios:
        raise ValueError("ratios: at least one survey is needed, e.g. 'sdss=0.5,decals=0.5'")
    out = {}
    for name, value in ratios.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"ratios: survey names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
            raise ValueError(f"ratios: {name}={value!r} is not a number")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"ratios: {name}={value!r} must be a positive share of the batch "
                             "(leave a survey out of the mix instead of giving it 0)")
        out[name] = float(value)
    total = math.fsum(out.values())
    if abs(total - 1.0) <= RATIO_SUM_TOLERANCE:
        return out  # already shares: kept exactly as written
    return {name: value / total for name, value in out.items()}


def format_shares(ratios: Mapping[str, float]) -> str:
    """'sdss 0.330, decals 0.330, hst 0.340': the normalised shares a run uses, for logs and reports."""
    return ", ".join(f"{name} {value:.3f}" for name, value in ratios.items())


def parse_ratios(text: str) -> dict[str, float]:
    """Parse "sdss=0.33,decals=0.33,hst=0.34" into {"sdss": 0.33, ...}, keeping the order given."""
    ratios: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise ValueError(f"ratios: {item.strip()!r} in {text!r} is not of the form survey=share")
        if name in ratios:
            raise ValueError(f"ratios: survey {name!r} appears twice in {text!r}")
        try:
            ratios[name] = float(value)
        except ValueError:
            raise ValueError(f"ratios: share {value!r} of survey {name!r} is not a number") from None
    return check_ratios(ratios)


def exact_ratios(ratios: Mapping[str, float]) -> dict[str, Fraction]:
    """Ratios as exact fractions summing to exactly 1, so floor/ceil of ratio * batch size are stable.

    Each float becomes its nearest fraction with denominator <= MAX_RATIO_DENOMINATOR; if those do not
    sum to 1 (ratios that are not short fractions), they are divided by their exact sum.
    """
    approx = {name: Fraction(value).limit_denominator(MAX_RATIO_DENOMINATOR)
              for name, value in check_ratios(ratios).items()}
    total = sum(approx.values())
    return approx if total == 1 else {name: value / total for name, value in approx.items()}


def pd2_priority(subtask: int, weight: Fraction) -> tuple[int, int, int]:
    """PD2 sort key of subtask `subtask` (1-based) of a task of weight in (0, 1): smaller runs first.

    Earliest pseudo-deadline d = ceil(i/w); on ties a set successor bit b (the next window overlaps
    this one) wins; among heavy tasks (w >= 1/2) with b set, the later group deadline D wins
    (Anderson & Srinivasan, "Mixed Pfair/ERfair scheduling of asynchronous periodic tasks", 2004).
    """
    return _priority(subtask, weight.numerator, weight.denominator)


def group_deadline(subtask: int, weight: Fraction) -> int:
    """PD2 group deadline of a heavy task's subtask: D = ceil(ceil(d * (1 - w)) / (1 - w)), d its deadline.

    It is the earliest time >= d at which a cascade of forced placements ends: the deadline of a
    later subtask with b = 0, or one slot before the deadline of a later window of length 3.
    """
    p, q = weight.numerator, weight.denominator
    assert 2 * p >= q and p < q, "group deadlines are defined for heavy tasks, 1/2 <= w < 1"
    return _group_deadline(-(-subtask * q // p), p, q)


def _priority(subtask: int, p: int, q: int) -> tuple[int, int, int]:
    deadline = -(-subtask * q // p)
    successor_bit = 1 if (subtask * q) % p else 0
    group = _group_deadline(deadline, p, q) if successor_bit and 2 * p >= q else 0
    return deadline, -successor_bit, -group


def _group_deadline(deadline: int, p: int, q: int) -> int:
    ceil_scaled = -(-deadline * (q - p) // q)
    return -(-ceil_scaled * q // (q - p))


def pd2_schedule(weights: Sequence[Fraction], num_slots: int) -> np.ndarray:
    """Which tasks run in each of `num_slots` slots under PD2 on M = sum(weights) processors.

    Weights lie in [0, 1) and sum to an integer M. Returns int8 (num_slots, num_tasks) with exactly M
    ones per row, and every task's lag |w * t - runs(t)| < 1 after every slot: PD2 is optimal for
    synchronous periodic tasks, i.e. it meets every pseudo-deadline. The schedule repeats every
    hyperperiod (lcm of the weights' denominators), so at most one hyperperiod is simulated.
    """
    weights = [Fraction(w) for w in weights]
    if any(w < 0 or w >= 1 for w in weights):
        raise ValueError(f"PD2 weights must lie in [0, 1), got {[str(w) for w in weights]}")
    total = sum(weights, Fraction(0))
    if total.denominator != 1:
        raise ValueError(f"PD2 weights must sum to a whole number of processors, got {total}")
    active = [s for s, w in enumerate(weights) if w > 0]
    hyperperiod = math.lcm(*(weights[s].denominator for s in active)) if active else 1
    num_simulated = min(num_slots, hyperperiod)
    schedule = _pd2_simulate(weights, active, int(total), num_simulated)
    if num_simulated == num_slots:
        return schedule
    runs = schedule.sum(axis=0)
    assert all(runs[s] == weights[s] * hyperperiod for s in active), "PD2 lag is not 0 at the hyperperiod"
    return np.tile(schedule, (-(-num_slots // hyperperiod), 1))[:num_slots]


def _pd2_simulate(weights: list[Fraction], active: list[int], num_processors: int,
                  num_slots: int) -> np.ndarray:
    schedule = np.zeros((num_slots, len(weights)), dtype=np.int8)
    num_done = [0] * len(weights)
    fractions = [(s, weights[s].numerator, weights[s].denominator) for s in active]
    for slot in range(num_slots):
        ready = []
        for s, p, q in fractions:
            subtask = num_done[s] + 1
            # Pfair (not ERfair): a subtask may run only from its pseudo-release floor((i - 1) / w).
            if (subtask - 1) * q // p <= slot:
                ready.append((*_priority(subtask, p, q), s))
        ready.sort()
        assert len(ready) >= num_processors, "PD2 left a processor idle: weights do not fill M"
        for *_, s in ready[:num_processors]:
            schedule[slot, s] = 1
            num_done[s] += 1
        for deadline, *_ in ready[num_processors:]:
            assert deadline > slot + 1, "PD2 missed a pseudo-deadline"
    return schedule


def allocate_batches(ratios: Mapping[str, float], global_batch_size: int, num_batches: int) -> np.ndarray:
    """Samples per survey in each global batch: int64 (num_batches, num_surveys), columns in `ratios` order.

    Survey s gets floor(B * r_s) every batch; the K = B - sum floor(B * r_s) spare slots per batch go
    to surveys by PD2 with weights frac(B * r_s) on K processors. So every row sums to B, every entry
    is floor or ceil of B * r_s, and every survey's running total stays strictly within one sample
    of r_s * samples so far, at every batch boundary.
    """
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
        raise ValueError(f"num_batches must be a non-negative integer, got {num_batches!r}")
    shares = tuple(exact_ratios(ratios).values())
    return _allocate(shares, global_batch_size, num_batches).copy()


@functools.lru_cache(maxsize=16)
def _allocate(shares: tuple[Fraction, ...], global_batch_size: int, num_batches: int) -> np.ndarray:
    exact = [share * global_batch_size for share in shares]
    floors = np.array([math.floor(x) for x in exact], dtype=np.int64)
    spare = pd2_schedule([x - math.floor(x) for x in exact], num_batches)
    counts = floors[None, :] + spare.astype(np.int64)
    assert (counts.sum(axis=1) == global_batch_size).all()
    counts.setflags(write=False)
    return counts


def max_drift(counts: np.ndarray, shares: Sequence[Fraction]) -> list[Fraction]:
    """Exact max over batch boundaries of |running total - share * samples so far|, per survey (column)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape[0] == 0:
        return [Fraction(0)] * len(shares)
    denominator = math.lcm(*(Fraction(s).denominator for s in shares))
    numerators = [int(Fraction(s) * denominator) for s in shares]
    cumulative = np.cumsum(counts, axis=0)
    totals = cumulative.sum(axis=1)
    # Exact integers: int64 while they fit, Python ints (object arrays) for huge denominators.
    big = denominator * int(totals[-1]) >= 2**62
    dtype = object if big else np.int64
    cumulative, totals = cumulative.astype(dtype), totals.astype(dtype)
    out = []
    for s, numerator in enumerate(numerators):
        error = cumulative[:, s] * denominator - totals * numerator
        out.append(Fraction(int(np.abs(error).max()), denominator))
    return out


@functools.lru_cache(maxsize=64)
def interleave_slots(counts: tuple[int, ...]) -> np.ndarray:
    """Order of sum(counts) slots as task ids, spreading each task evenly (EPDF on one processor).

    Task s's subtask i has window [floor((i-1) n / c_s), ceil(i n / c_s)); earliest deadline first
    (ties by task id) meets every window on one processor, so every prefix of m slots holds task s
    strictly within one of m * c_s / n times, and every contiguous run of slots within two.
    """
    total = sum(counts)
    events = sorted(((i - 1) * total // c, -(-i * total // c), s)
                    for s, c in enumerate(counts) for i in range(1, c + 1))
    order = np.empty(total, dtype=np.int64)
    ready: list[tuple[int, int]] = []
    next_event = 0
    for slot in range(total):
        while next_event < total and events[next_event][0] <= slot:
            heapq.heappush(ready, events[next_event][1:])
            next_event += 1
        assert ready, "EPDF found no ready subtask: counts do not fill the slots"
        deadline, s = heapq.heappop(ready)
        assert deadline > slot, "EPDF missed a pseudo-deadline on one processor"
        order[slot] = s
    order.setflags(write=False)
    return order


def slot_positions(counts: np.ndarray, starts: np.ndarray, batches: np.ndarray,
                   slots: slice) -> tuple[np.ndarray, np.ndarray]:
    """Survey of each slot in `slots` of the given batches, and that sample's position in its survey's stream.

    `counts` is (num_batches, num_surveys) samples per batch and `starts` each survey's stream position
    at each batch start. Batch b lays out its surveys by the EPDF pattern of its counts, rotated left by
    b * g mod B (g coprime to B, nearest B / golden ratio). Rotation keeps every contiguous slice within
    two samples of its share and, over batches, spreads every survey evenly over the ranks of any world
    size. A survey's samples take its stream positions in slot order, so a slice's share is a run.
    """
    batch_size = int(counts[0].sum())
    rows, row_ids = np.unique(counts[batches], axis=0, return_inverse=True)
    row_ids = row_ids.reshape(-1)
    patterns, ranks, before = (np.stack(parts) for parts in zip(*(
        _pattern_layout(tuple(int(c) for c in row)) for row in rows)))
    offsets = batches * _rotation_stride(batch_size) % batch_size
    index = (np.arange(slots.start, slots.stop)[None, :] + offsets[:, None]) % batch_size
    surveys = np.take_along_axis(patterns[row_ids], index, axis=1)
    skipped = np.take_along_axis(before[row_ids, offsets], surveys, axis=1)
    rank = np.take_along_axis(ranks[row_ids], index, axis=1) - skipped
    rank %= np.take_along_axis(counts[batches], surveys, axis=1)
    return surveys, np.take_along_axis(starts[batches], surveys, axis=1) + rank


@functools.lru_cache(maxsize=64)
def _pattern_layout(counts: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPDF slot pattern, each slot's rank among its survey's slots, and per-survey counts before each slot."""
    pattern = interleave_slots(counts)
    one_hot = pattern[:, None] == np.arange(len(counts))
    before = np.concatenate([np.zeros((1, len(counts)), dtype=np.int64), np.cumsum(one_hot, axis=0)])
    return pattern, before[np.arange(len(pattern)), pattern], before


@functools.lru_cache(maxsize=16)
def _rotation_stride(batch_size: int) -> int:
    # Coprime: B consecutive batches use every offset once. Near B / golden ratio: successive offsets
    # spread evenly, which measured far better per-rank long-run balance than the first coprime above.
    target = batch_size * 0.6180339887498949
    return min((g for g in range(1, batch_size + 1) if math.gcd(g, batch_size) == 1),
               key=lambda g: (abs(g - target), g))
