"""Mix schedules: survey shares that change with the global step, allocated exactly batch by batch.

A schedule is phases by global step ("0:hst=2.5,sdss=1;2000:sdss=1,decals=1,hst=1"), each phase's weights
normalised to shares (a survey missing from a phase has share 0 there), held constant within the phase ("step")
or moved linearly from one phase's shares to the next ("linear"); after the last phase starts, the shares stay.

Every global batch gives survey s floor or ceil of B * r_s(t), the shares of the batch's own step, and every
survey's running total stays strictly within one sample of the schedule's integral sum_t B * r_s(t) at every batch
boundary, across phase changes too. Restarting PD2 (loaders.pfair) at each change would carry the previous
phase's lag into the next and could reach two samples; instead the allocation is a path through a small state
graph. After t batches a survey's total must be floor or ceil of its integral F_s(t), so the state is which
surveys sit at the ceiling (a bitmask); a batch moves between states by giving the spare slots (the fractional
parts of B * r_s(t)) to some surveys. Such a path exists for every schedule: x = the fractional parts themselves
is a feasible fractional flow, and the flow polytope is integral. It is found exactly, in two passes: once the
shares are constant they repeat with the period P of their fractional parts, so the states with an infinite
future are the greatest fixed point of "has a successor that has one" on P positions; backwards from those over
the batches before, and forwards choosing among the states that keep a future (the most-behind survey first).
Forwards the path is deterministic, so in the constant tail it becomes periodic and is stored once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

from loaders.pfair import exact_ratios, parse_ratios

MAX_TAIL_PERIOD = 20_000
"""Batches after which the last phase's spare-slot pattern repeats; longer periods (shares that are not short
fractions of the batch) are refused rather than solved slowly."""
MAX_SURVEYS = 10


@dataclasses.dataclass(frozen=True)
class MixSchedule:
    """Phases of survey shares by global step; `names` is the union of the phases' surveys, in first-seen order."""

    names: tuple[str, ...]
    starts: tuple[int, ...]
    """The global step each phase starts at: 0 first, strictly increasing."""
    shares: tuple[tuple[Fraction, ...], ...]
    """Per phase, exact shares summing to 1, aligned with `names` (0 for a survey absent from the phase)."""
    interpolation: str = "step"
    """"step": each phase's shares hold until the next starts; "linear": they move linearly to the next phase's."""

    def __post_init__(self) -> None:
        if not self.starts or self.starts[0] != 0:
            raise ValueError(f"mix schedule: the first phase must start at step 0, got starts {list(self.starts)}")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ValueError(f"mix schedule: phase starts must increase, got {list(self.starts)}")
        if self.interpolation not in ("step", "linear"):
            raise ValueError(f"mix schedule: interpolation must be 'step' or 'linear', got {self.interpolation!r}")
        if len(self.names) > MAX_SURVEYS:
            raise ValueError(f"mix schedule: at most {MAX_SURVEYS} surveys, got {len(self.names)}")
        assert all(len(row) == len(self.names) and sum(row) == 1 for row in self.shares)

    @property
    def constant_from(self) -> int:
        """The first step from which the shares no longer change."""
        return self.starts[-1]

    def shares_at(self, step: int) -> tuple[Fraction, ...]:
        """Exact shares of the global batch of `step`."""
        k = int(np.searchsorted(self.starts, step, side="right")) - 1
        if self.interpolation == "step" or k == len(self.starts) - 1:
            return self.shares[k]
        a = Fraction(step - self.starts[k], self.starts[k + 1] - self.starts[k])
        return tuple(x + (y - x) * a for x, y in zip(self.shares[k], self.shares[k + 1]))

    def describe(self) -> str:
        """'0: hst 0.543, sdss 0.217, decals 0.239; 2000: ...' for logs and reports."""
        phases = []
        for start, row in zip(self.starts, self.shares):
            phases.append(f"{start}: " + ", ".join(f"{n} {float(r):.3f}" for n, r in zip(self.names, row) if r))
        joiner = " -> (linear) -> " if self.interpolation == "linear" else "; "
        return joiner.join(phases)

    def to_json(self) -> dict:
        return {"names": list(self.names), "starts": list(self.starts), "interpolation": self.interpolation,
                "shares": [[str(r) for r in row] for row in self.shares]}


def make_schedule(phases: Sequence[tuple[int, Mapping[str, float] | str]], interpolation: str = "step") -> MixSchedule:
    """A schedule from (start step, weights) pairs; weights are normalised per phase like a plain mix."""
    if not phases:
        raise ValueError("mix schedule: at least one phase is needed")
    parsed = [(start, parse_ratios(w) if isinstance(w, str) else dict(w)) for start, w in phases]
    names: list[str] = []
    for _, weights in parsed:
        names += [n for n in weights if n not in names]
    rows = []
    for _, weights in parsed:
        exact = exact_ratios(weights)
        rows.append(tuple(exact.get(n, Fraction(0)) for n in names))
    for start, _ in parsed:
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"mix schedule: phase start {start!r} is not a step >= 0")
    return MixSchedule(tuple(names), tuple(s for s, _ in parsed), tuple(rows), interpolation)


def parse_schedule(text: str, interpolation: str = "step") -> MixSchedule:
    """'0:hst=2.5,sdss=1,decals=1.1;2000:sdss=1,decals=1,hst=1' (each phase starts at its global step)."""
    phases = []
    for item in (part.strip() for part in text.split(";")):
        start, sep, mix = item.partition(":")
        if not sep or not start.strip().isdigit():
            raise ValueError(f"mix schedule: {item!r} in {text!r} is not of the form STEP:survey=weight,...")
        phases.append((int(start), mix))
    return make_schedule(phases, interpolation)


def schedule_from_phases(phases: Sequence[Mapping], interpolation: str = "step") -> MixSchedule:
    """The training YAML's form: [{until_step: 2000, mix: "hst=2.5,sdss=1"}, {mix: "sdss=1,hst=1"}]."""
    out, start = [], 0
    for i, phase in enumerate(phases):
        unknown = set(phase) - {"until_step", "mix"}
        if unknown or "mix" not in phase:
            raise ValueError(f"mix_schedule phase {i}: keys are until_step and mix, got {sorted(phase)}")
        out.append((start, phase["mix"]))
        until = phase.get("until_step")
        last = i == len(phases) - 1
        if (until is None) != last:
            raise ValueError(f"mix_schedule phase {i}: every phase but the last needs until_step, and the last "
                             "none (it runs to the end)")
        if not last:
            if isinstance(until, bool) or not isinstance(until, int) or until <= start:
                raise ValueError(f"mix_schedule phase {i}: until_step {until!r} must be a step after {start}")
            start = until
    return make_schedule(out, interpolation)


def schedule_allocation(schedule: MixSchedule, batch_size: int, start: int, stop: int) -> np.ndarray:
    """Samples per survey in global batches [start, stop): int64 (stop - start, num_surveys), `names` order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {batch_size!r}")
    if not 0 <= start <= stop:
        raise ValueError(f"batch range [{start}, {stop}) is not a range of global batches")
    plan = _plan(schedule, batch_size)
    steps = np.arange(start, stop)
    head = len(plan.head)
    rows = np.empty((len(steps), len(schedule.names)), dtype=np.int64)
    early = steps < head
    rows[early] = plan.head[steps[early]]
    late = steps[~early] - head
    rows[~early] = plan.cycle[late % len(plan.cycle)]
    return rows


def schedule_integral(schedule: MixSchedule, batch_size: int, num_batches: int) -> list[list[Fraction]]:
    """sum over the first t batches of B * r_s(step), for t = 1..num_batches (exact; for checks and inspection)."""
    totals, running = [], [Fraction(0)] * len(schedule.names)
    for step in range(num_batches):
        running = [x + batch_size * r for x, r in zip(running, schedule.shares_at(step))]
        totals.append(running)
    return totals


@dataclasses.dataclass(frozen=True)
class _Plan:
    head: np.ndarray  # (H, S) counts of the first H batches (the varying part and the tail's transient)
    cycle: np.ndarray  # (C, S) counts repeating from batch H on


@functools.lru_cache(maxsize=16)
def _plan(schedule: MixSchedule, batch_size: int) -> _Plan:
    n = len(schedule.names)
    head_steps = schedule.constant_from
    targets = [_batch_targets(schedule.shares_at(t), batch_size) for t in range(head_steps)]
    tail = _batch_targets(schedule.shares[-1], batch_size)
    period = math.lcm(*(f.denominator for f in tail[1]))
    if period > MAX_TAIL_PERIOD:
        raise ValueError(f"mix schedule: the last phase's shares {[str(r) for r in schedule.shares[-1]]} of a batch "
                         f"of {batch_size} repeat only every {period} batches; use weights that are short fractions "
                         "of the batch (e.g. integers)")
    # Fractional parts of F_s at the tail's start decide which lag values the tail can hold.
    start_frac = [sum((spare[s] for _, spare in targets), Fraction(0)) % 1 for s in range(n)]
    tail_good = _tail_fixed_point(tail, start_frac, period)
    reach = _backward(targets, start_frac, tail_good[0])
    if 0 not in reach[0]:
        raise AssertionError("mix schedule: no exact allocation found; this contradicts integrality")
    rows, mask, fracs = [], 0, [Fraction(0)] * n
    for t, target in enumerate(targets):
        mask, counts = _choose(target, fracs, mask, reach[t + 1])
        fracs = [(a + b) % 1 for a, b in zip(fracs, target[1])]
        rows.append(counts)
    seen: dict[tuple[int, int], int] = {}
    tail_rows, tau = [], 0
    while (tau % period, mask) not in seen:
        seen[(tau % period, mask)] = len(tail_rows)
        mask, counts = _choose(tail, fracs, mask, tail_good[(tau + 1) % period])
        fracs = [(a + b) % 1 for a, b in zip(fracs, tail[1])]
        tail_rows.append(counts)
        tau += 1
    first = seen[(tau % period, mask)]
    head = np.array(rows + tail_rows[:first], dtype=np.int64).reshape(-1, n)
    cycle = np.array(tail_rows[first:], dtype=np.int64).reshape(-1, n)
    head.setflags(write=False)
    cycle.setflags(write=False)
    return _Plan(head, cycle)


def _batch_targets(shares: Sequence[Fraction], batch_size: int) -> tuple[tuple[int, ...], tuple[Fraction, ...]]:
    exact = [r * batch_size for r in shares]
    floors = tuple(math.floor(x) for x in exact)
    return floors, tuple(x - f for x, f in zip(exact, floors))


def _successors(fracs: Sequence[Fraction], mask: int, spare: Sequence[Fraction]):
    """(next mask, survey subset) for every valid way to hand out one batch's spare slots.

    Bit s of a mask: survey s's total sits at ceil(F_s) (above its integral); clear: at floor(F_s). With
    F_s's fractional part g, the lag F_s - X_s is g (bit clear) or g - 1 (bit set); a batch adds its spare
    fraction f_s to the lag and takes 1 for each chosen survey; the new lag must lie in (-1, 1).
    """
    n = len(fracs)
    lags = [fracs[s] - ((mask >> s) & 1) for s in range(n)]
    grown = [lag + f for lag, f in zip(lags, spare)]
    k = int(sum(spare))
    must = [s for s in range(n) if grown[s] >= 1]
    free = [s for s in range(n) if spare[s] > 0 and s not in must and grown[s] - 1 > -1]
    if len(must) > k or len(must) + len(free) < k:
        return
    for extra in itertools.combinations(free, k - len(must)):
        chosen = set(must).union(extra)
        new_mask = 0
        for s in range(n):
            lag = grown[s] - (s in chosen)
            if lag < 0:  # total above the integral: the ceiling (a lag of exactly 0 is the floor, bit clear)
                new_mask |= 1 << s
        yield new_mask, chosen, grown


def _tail_fixed_point(tail, start_frac: Sequence[Fraction], period: int) -> list[set[int]]:
    """Per tail offset (mod period), the states from which the constant tail can go on forever."""
    n = len(start_frac)
    fracs_at = [[(g + tau * f) % 1 for g, f in zip(start_frac, tail[1])] for tau in range(period)]
    good = [set(_states(fracs_at[tau])) for tau in range(period)]
    changed = True
    while changed:
        changed = False
        for tau in reversed(range(period)):
            nxt = good[(tau + 1) % period]
            keep = {m for m in good[tau] if any(m2 in nxt for m2, *_ in _successors(fracs_at[tau], m, tail[1]))}
            if keep != good[tau]:
                good[tau], changed = keep, True
    assert good[0], f"mix schedule: the constant tail has no exact allocation ({n} surveys)"
    return good


def _states(fracs: Sequence[Fraction]) -> list[int]:
    """Masks whose lags sum to 0 (the totals add up to the samples so far); a survey with an integral F has no bit."""
    n = len(fracs)
    free = [s for s in range(n) if fracs[s]]
    need = sum(fracs)  # number of surveys that must sit at the ceiling so that the lags sum to 0
    return [sum(1 << s for s in chosen) for chosen in itertools.combinations(free, int(need))]


def _backward(targets, start_frac: Sequence[Fraction], tail_good: set[int]) -> list[set[int]]:
    """reach[t]: states after t batches from which the rest of the schedule (and the tail) can be allocated."""
    n = len(start_frac)
    fracs = [[Fraction(0)] * n]
    for _, spare in targets:
        fracs.append([(a + b) % 1 for a, b in zip(fracs[-1], spare)])
    assert all(a == b for a, b in zip(fracs[-1], start_frac))
    reach = [set() for _ in range(len(targets) + 1)]
    reach[-1] = set(tail_good)
    for t in reversed(range(len(targets))):
        reach[t] = {m for m in _states(fracs[t])
                    if any(m2 in reach[t + 1] for m2, *_ in _successors(fracs[t], m, targets[t][1]))}
    return reach


def _choose(target, fracs: Sequence[Fraction], mask: int, allowed: set[int]) -> tuple[int, list[int]]:
    """The successor kept in `allowed` that serves the surveys furthest behind first (deterministic)."""
    floors, spare = target
    best = None
    for new_mask, chosen, grown in _successors(fracs, mask, spare):
        if new_mask not in allowed:
            continue
        key = sorted((-grown[s], s) for s in chosen)
        if best is None or key < best[0]:
            best = (key, new_mask, chosen)
    assert best is not None, "mix schedule: the allocation left the states that have a future"
    _, new_mask, chosen = best
    return new_mask, [floors[s] + (s in chosen) for s in range(len(floors))]


def schedule_drift(schedule: MixSchedule, batch_size: int, counts: np.ndarray,
                   first: int = 0) -> list[tuple[Fraction, int]]:
    """Per survey, (the exact max over batch boundaries of |running total - the schedule's integral|, the row of
    `counts` it ends), for `counts` holding global batches first, first + 1, ... and the schedule's own allocation
    before `first`."""
    before = schedule_allocation(schedule, batch_size, 0, first).sum(axis=0)
    totals = [int(x) for x in before] if first else [0] * len(schedule.names)
    integral = [Fraction(0)] * len(schedule.names)
    for step in range(first):
        integral = [x + batch_size * r for x, r in zip(integral, schedule.shares_at(step))]
    worst = [(Fraction(0), -1)] * len(schedule.names)
    for i, row in enumerate(np.asarray(counts, dtype=np.int64)):
        integral = [x + batch_size * r for x, r in zip(integral, schedule.shares_at(first + i))]
        totals = [t + int(c) for t, c in zip(totals, row)]
        worst = [(abs(t - x), i) if abs(t - x) > w[0] else w for w, t, x in zip(worst, totals, integral)]
    return worst


def batch_bounds(schedule: MixSchedule, batch_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """floor and ceil of B * r_s(step) for the global batches [start, stop): the allowed counts of each."""
    exact = [[batch_size * r for r in schedule.shares_at(t)] for t in range(start, stop)]
    shape = (stop - start, len(schedule.names))
    floors = np.array([[math.floor(x) for x in row] for row in exact], dtype=np.int64).reshape(shape)
    ceils = np.array([[math.ceil(x) for x in row] for row in exact], dtype=np.int64).reshape(shape)
    return floors, ceils
