"""Shared cases and reference implementations for the mixing tests (allocation and sampler)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from loaders.sampler import (MixConfig, iter_rank_batches)

# Exact shares the float ratios stand for, written independently of exact_ratios().
RATIO_CASES = {
    "0.33/0.33/0.34": ({"sdss": 0.33, "decals": 0.33, "hst": 0.34}, [Fraction(33, 100)] * 2 + [Fraction(34, 100)]),
    "thirds": ({"sdss": 1 / 3, "decals": 1 / 3, "hst": 1 / 3}, [Fraction(1, 3)] * 3),
    "5%": ({"sdss": 0.5, "decals": 0.45, "hst": 0.05}, [Fraction(1, 2), Fraction(9, 20), Fraction(1, 20)]),
    "2 surveys": ({"sdss": 0.7, "decals": 0.3}, [Fraction(7, 10), Fraction(3, 10)]),
    "4 surveys": ({"sdss": 0.4, "decals": 0.25, "hst": 0.3, "ukidss": 0.05},
                  [Fraction(2, 5), Fraction(1, 4), Fraction(3, 10), Fraction(1, 20)]),
}
BATCH_SIZES = (1, 7, 32, 64, 96, 256)
SEEDS = (0, 17)

# Shard sample counts per survey (last shard short, one empty shard); "hst" is small so "stop" binds.
SHARD_COUNTS = {
    "sdss": [50] * 24 + [13],
    "decals": [40] * 20 + [0, 7],
    "hst": [30] * 6 + [11],
    "ukidss": [25] * 40,
}


def drift_exact(counts: np.ndarray, shares: list[Fraction]) -> list[Fraction]:
    """Max |running total - share * samples| per survey over batch boundaries, in exact integers."""
    denominator = math.lcm(*(s.denominator for s in shares))
    cumulative = np.cumsum(np.asarray(counts, dtype=np.int64), axis=0).astype(object)
    totals = cumulative.sum(axis=1)
    return [Fraction(int(np.abs(cumulative[:, s] * denominator - totals * int(share * denominator)).max()),
                     denominator) for s, share in enumerate(shares)]


def check_allocation(counts: np.ndarray, shares: list[Fraction], batch_size: int) -> None:
    floors = np.array([math.floor(batch_size * s) for s in shares])
    ceils = np.array([math.ceil(batch_size * s) for s in shares])
    assert (counts.sum(axis=1) == batch_size).all()
    assert ((counts >= floors) & (counts <= ceils)).all()
    drift = drift_exact(counts, shares)
    assert max(drift) < 1, f"drift {[float(d) for d in drift]} for shares {shares}, B={batch_size}"


def largest_deficit_counts(shares: list[Fraction], batch_size: int, num_batches: int) -> np.ndarray:
    """The naive rule: floors, then the spare slots to the surveys furthest behind their target."""
    denominator = math.lcm(*(s.denominator for s in shares))
    numerators = [int(s * denominator) for s in shares]
    floors = [n * batch_size // denominator for n in numerators]
    num_spare = batch_size - sum(floors)
    cumulative, rows = [0] * len(shares), []
    for t in range(1, num_batches + 1):
        deficit = [n * batch_size * t - (c + f) * denominator for n, c, f in zip(numerators, cumulative, floors)]
        row = list(floors)
        for s in sorted(range(len(shares)), key=lambda s: (-deficit[s], s))[:num_spare]:
            row[s] += 1
        cumulative = [c + r for c, r in zip(cumulative, row)]
        rows.append(row)
    return np.array(rows)


def reference_pfair_counts(shares: list[Fraction], batch_size: int, num_batches: int,
                           tie_breaks: str = "pd2") -> np.ndarray:
    """A Fraction-based reference: EPDF ("epdf"), EPDF + b-bit ("b"), or full PD2 from the definitions."""
    floors = [math.floor(batch_size * s) for s in shares]
    weights = [batch_size * s - f for s, f in zip(shares, floors)]
    num_spare = batch_size - sum(floors)
    done, rows = [0] * len(shares), []
    for t in range(num_batches):
        ready = []
        for s, w in enumerate(weights):
            i = done[s] + 1
            if w == 0 or math.floor((i - 1) / w) > t:
                continue
            bit = math.ceil(i / w) - math.floor(i / w)
            key = [math.ceil(i / w)]
            if tie_breaks in ("b", "pd2"):
                key.append(-bit)
            if tie_breaks == "pd2":
                key.append(-group_deadline_by_definition(i, w) if bit and w >= Fraction(1, 2) else 0)
            ready.append((key, s))
        row = list(floors)
        for _, s in sorted(ready)[:num_spare]:
            row[s] += 1
            done[s] += 1
        rows.append(row)
    return np.array(rows)


def group_deadline_by_definition(i: int, w: Fraction) -> int:
    """Earliest t >= d(T_i) with t = d(T_k), b(T_k) = 0, or t + 1 = d(T_k), |window(T_k)| = 3, k >= i."""
    own_deadline = math.ceil(i / w)
    k = i
    while True:
        deadline, release = math.ceil(k / w), math.floor((k - 1) / w)
        candidates = [deadline] if deadline == k / w else []
        if deadline - release == 3 and deadline - 1 >= own_deadline:
            candidates.append(deadline - 1)
        if candidates:
            return min(candidates)
        k += 1


def as_ratios(shares: list[Fraction]) -> dict[str, float]:
    return {f"s{i}": float(s) for i, s in enumerate(shares)}


def mix_for(case: str, batch_size: int, seed: int = 0, on_exhausted: str = "stop",
            epoch_batches: int = 12, window: int = 3) -> MixConfig:
    return MixConfig(ratios=RATIO_CASES[case][0], global_batch_size=batch_size, seed=seed,
                     epoch_samples=epoch_batches * batch_size, on_exhausted=on_exhausted,
                     shuffle_window_shards=window)


def rank_stream(mix: MixConfig, epoch: int, rank: int, world_size: int, num_workers: int,
                start_sample: int = 0) -> list[tuple[int, np.ndarray]]:
    """What a torch DataLoader yields for one rank: round-robin over its workers' iterators."""
    iterators = [iter_rank_batches(SHARD_COUNTS, mix, epoch, rank, world_size, k, num_workers, start_sample)
                 for k in range(max(num_workers, 1))]
    out, active = [], list(iterators)
    while active:
        for it in list(active):
            item = next(it, None)
            if item is None:
                active.remove(it)
            else:
                out.append(item)
    return out


# ---------------------------------------------------------------- ratios and config


