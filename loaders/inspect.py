"""Is my mix right? Per-step survey counts, drift, duplicates and rank disjointness of the mixing sampler."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from loaders.pfair import exact_ratios
from loaders.sampler import MixConfig, MixingSampler, global_order, mixing_report
from loaders.schedule import batch_bounds, parse_schedule, schedule_drift
from loaders.inspect_grid import MAX_GRID_TILES, SURVEY_COLOURS, write_grid  # noqa: F401 (SURVEY_COLOURS: callers)
from loaders.shards import SurveyShards, load_shard_root

NUM_TABLE_STEPS = 8
"""Steps printed one per row in the human table; min/max rows cover all inspected steps."""

DESCRIPTION = """\
Check a survey mix before spending cluster hours on it. Runs the exact mixing sampler over the
built shards the way training would: every rank iterates its own slice of each global batch
(optionally from a sampler state restored at --resume-from-step), and the tool reports per-survey
counts per global batch against ratio x batch size, the largest drift of any survey's running total
from its target, duplicates within the epoch, whether two ranks ever read the same sample, whether
every rank gets the same number of batches, and whether the ranks' slices glue back into the one
world-size-independent global order. Exit code 0: the mix is exact; 1: a check failed; 2: bad input."""

EPILOG = """\
example:
  python -m loaders.inspect --shards data/shards --mix sdss=0.33,decals=0.33,hst=0.34 \\
      --global-batch-size 64 --world-size 4 --steps 100 --grid batch.png
  python -m loaders.inspect ... --json | jq .max_drift"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loaders.inspect", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--shards", required=True, type=Path, metavar="DIR", help="shard root holding <survey>/manifest.json")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--mix", metavar="SURVEY=SHARE,...",
                       help="survey shares of every global batch, e.g. sdss=0.33,decals=0.33,hst=0.34")
    which.add_argument("--mix-schedule", metavar="STEP:SURVEY=W,...;STEP:...",
                       help="shares that change with the global step, each phase from its step on (the first at 0), "
                            "e.g. '0:hst=2.5,sdss=1,decals=1.1;2000:sdss=1,decals=1,hst=1' (training's "
                            "data.mix_schedule); implies --on-exhausted repeat")
    add("--mix-interpolation", choices=("step", "linear"), default="step",
        help="with --mix-schedule: hold each phase's shares (step) or move linearly to the next phase's (linear)")
    add("--global-batch-size", type=int, required=True, metavar="B", help="samples per optimizer step over all ranks")
    add("--world-size", type=int, default=1, metavar="W", help="number of ranks; must divide the global batch size (default 1)")
    add("--steps", type=int, default=100, metavar="N", help="global batches to inspect, cut at the epoch end (default 100)")
    add("--resume-from-step", type=int, default=0, metavar="K",
        help="start from a sampler state saved after K global batches, as a resumed run would (default 0)")
    add("--seed", type=int, default=0, metavar="S", help="sampler seed (default 0)")
    add("--epoch", type=int, default=0, metavar="E", help="epoch to inspect (default 0)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--epoch-samples", type=int, metavar="N", help="epoch size in samples (default: all train samples "
                      "of the mixed surveys), rounded down to whole global batches")
    size.add_argument("--epoch-multiplier", type=float, metavar="M", help="epoch size = min(train samples per survey) * M")
    add("--on-exhausted", choices=("repeat", "stop"), default="stop",
        help="a survey that runs out: 'repeat' it (duplicates allowed) or 'stop' the epoch (default stop)")
    add("--split", default="train", help="shard split to mix (default train)")
    add("--json", action="store_true", help="print one JSON object on stdout instead of the human report")
    add("--grid", type=Path, metavar="PNG", help="write a contact sheet of the first inspected step's augmented "
        f"global batch (at most {MAX_GRID_TILES} tiles), labelled and colour-coded by survey")
    add("--backend", choices=("dali", "torch"), default="torch", help="loader backend for --grid (default torch)")
    add("--image-size", type=int, default=128, metavar="PX", help="tile size in pixels for --grid (default 128)")
    add("--workers", type=int, default=0, metavar="W", help="loader workers for --grid (default 0: in-process)")
    add("--augment", action=argparse.BooleanOptionalAction, default=True,
        help="augment the --grid batch as training would (default on)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage error (or --help)
        return int(exit_.code or 0)
    try:
        mix, surveys = _setup(args)
        report = inspect_mix(surveys, mix, args.world_size, args.steps, args.resume_from_step, args.epoch)
        if args.grid is not None:
            state = None
            if args.resume_from_step or args.epoch:
                state = resumed_sampler({s.name: s.shard_counts for s in surveys}, mix, args.epoch,
                                        args.resume_from_step).state_dict()
            report["grid"] = write_grid(args, mix, state, report)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def _setup(args: argparse.Namespace) -> tuple[MixConfig, list[SurveyShards]]:
    for name in ("global_batch_size", "world_size", "steps", "image_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("resume_from_step", "seed", "epoch", "workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.global_batch_size % args.world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by --world-size "
                         f"{args.world_size}: every rank must read the same number of samples per step")
    schedule = None if args.mix_schedule is None else parse_schedule(args.mix_schedule, args.mix_interpolation)
    on_exhausted = "repeat" if schedule is not None else args.on_exhausted
    ratios = MixConfig(ratios=args.mix or {}, global_batch_size=args.global_batch_size, epoch_samples=1,
                       schedule=schedule, on_exhausted=on_exhausted).ratios
    surveys = load_shard_root(args.shards, list(ratios), args.split)
    epoch_samples = args.epoch_samples
    if epoch_samples is None and args.epoch_multiplier is None:
        epoch_samples = sum(s.num_samples for s in surveys)
    mix = MixConfig(ratios=ratios, global_batch_size=args.global_batch_size, seed=args.seed,
                    epoch_samples=epoch_samples, epoch_multiplier=args.epoch_multiplier,
                    on_exhausted=on_exhausted, schedule=schedule)
    return mix, surveys


def resumed_sampler(shard_counts: dict[str, list[int]], mix: MixConfig, epoch: int, step: int) -> MixingSampler:
    """A fresh sampler restored from the state a run saved after `step` global batches of `epoch`."""
    trainer = MixingSampler(shard_counts, mix, epoch)
    if not 0 <= step < trainer.num_batches:
        raise ValueError(f"--resume-from-step {step} is outside the epoch's {trainer.num_batches} global batches")
    trainer.advance(step)
    resumed = MixingSampler(shard_counts, mix, epoch)
    resumed.load_state_dict(json.loads(json.dumps(trainer.state_dict())))  # as if read back from a checkpoint
    assert (resumed.epoch, resumed.batch_index) == (epoch, step)
    return resumed


def read_ranks(sampler: MixingSampler, world_size: int) -> tuple[np.ndarray, list[int]]:
    """Every rank's rest of the epoch, iterated as that rank would: (int64 (world_size, batches, B/W, 3)
    cut to the batches every rank yielded with the same global batch indices, batches per rank)."""
    per_rank, indices = [], []
    for rank in range(world_size):
        batches = list(sampler.rank_batches(rank, world_size))
        indices.append([b for b, _ in batches])
        per_rank.append(np.stack([rows for _, rows in batches]) if batches else
                        np.empty((0, sampler.mix.global_batch_size // world_size, 3), np.int64))
    common = 0
    while all(len(b) > common and b[common] == indices[0][common] for b in indices):
        common += 1
    return np.stack([rows[:common] for rows in per_rank]), [len(b) for b in indices]


def inspect_mix(surveys: list[SurveyShards], mix: MixConfig, world_size: int, num_steps: int,
                resume_from_step: int = 0, epoch: int = 0) -> dict[str, Any]:
    """The whole report as plain JSON-ready values (see --help); "ok" is False if any check failed."""
    names = list(mix.ratios)
    shard_counts = {s.name: s.shard_counts for s in surveys}
    sampler = resumed_sampler(shard_counts, mix, epoch, resume_from_step)
    order = global_order(shard_counts, mix, epoch)
    epoch_report = mixing_report(order, mix, epoch)
    ranks, batches_per_rank = read_ranks(sampler, world_size)  # (W, batches, B/W, 3)
    glued = ranks.transpose(1, 0, 2, 3).reshape(-1, 3)
    shown = range(resume_from_step, resume_from_step + min(num_steps, ranks.shape[1]))
    steps = [_step_record(surveys, names, ranks[:, i], step) for i, step in enumerate(shown)]
    counts = np.array([[s["counts"][n] for n in names] for s in steps], dtype=np.int64).reshape(-1, len(names))
    first = epoch * order.num_batches  # the global step of the epoch's first batch
    expect = _expected(mix, first + resume_from_step, len(steps))
    if mix.schedule is None:
        shares = [exact_ratios(mix.ratios)[n] for n in names]
        drift, drift_step, drift_survey = _drift(np.concatenate([order.counts[:resume_from_step], counts]), shares)
    else:
        drift, drift_step, drift_survey = _schedule_drift(mix, first, order.counts[:resume_from_step], counts)
    keys = [key for step in steps for rank_keys in step["keys_by_rank"] for key in rank_keys]
    report = {
        "surveys": names, "ratios": dict(mix.ratios), "global_batch_size": mix.global_batch_size,
        "world_size": world_size, "batch_size_per_rank": mix.global_batch_size // world_size,
        "seed": mix.seed, "epoch": epoch, "on_exhausted": mix.on_exhausted, "split_samples":
        {s.name: s.num_samples for s in surveys}, "epoch_batches": order.num_batches,
        "resume_from_step": resume_from_step, "steps_requested": num_steps, "steps": steps,
        "schedule": None if mix.schedule is None else {**mix.schedule.to_json(), "text": mix.schedule.describe(),
                                                       "epoch_first_step": first},
        "targets": {n: float(x) / max(len(steps), 1) for n, x in zip(names, expect["total"])},
        "totals": dict(zip(names, counts.sum(axis=0).tolist())),
        "target_totals": {n: float(x) for n, x in zip(names, expect["total"])},
        "count_range": {n: [int(min(counts[:, s], default=0)), int(max(counts[:, s], default=0))]
                        for s, n in enumerate(names)},
        "rank_count_range": _rank_count_range(ranks[:, :len(steps)], names),
        "counts_within_floor_ceil": bool(((counts >= expect["floors"]) & (counts <= expect["ceils"])).all()
                                         and (counts.sum(axis=1) == mix.global_batch_size).all()),
        "max_drift": drift, "max_drift_step": drift_step,
        "max_drift_survey": None if drift_survey is None else names[drift_survey],
        "epoch_max_drift": max(epoch_report["max_drift"]),
        "duplicates": int(sum(epoch_report["num_duplicates"])),
        "duplicates_allowed": mix.on_exhausted == "repeat",
        "duplicates_in_steps": len(keys) - len(set(keys)),
        "rank_overlap": _rank_overlap(surveys, ranks), "batches_per_rank": batches_per_rank,
        "matches_global_order": bool(np.array_equal(glued, order.samples[resume_from_step * mix.global_batch_size:])),
    }
    report["rank_disjoint"] = report["rank_overlap"] == 0
    report["problems"] = _problems(report)
    report["ok"] = not report["problems"]
    return report


def _step_record(surveys: list[SurveyShards], names: list[str], rank_rows: np.ndarray, step: int) -> dict:
    keys_by_rank = [[surveys[s].key(shard, index) for s, shard, index in rows.tolist()] for rows in rank_rows]
    counts = np.bincount(rank_rows[..., 0].reshape(-1), minlength=len(names))
    return {"step": step, "counts": dict(zip(names, counts.tolist())), "keys_by_rank": keys_by_rank}


def _drift(counts: np.ndarray, shares: Sequence[Fraction]) -> tuple[float, int, int | None]:
    """Max |running total - share * samples| over batch boundaries: (samples, step it ends, survey index)."""
    if not len(counts):
        return 0.0, -1, None
    denominator = math.lcm(*(s.denominator for s in shares))
    cumulative = np.cumsum(counts, axis=0).astype(object)
    totals = cumulative.sum(axis=1)
    error = np.stack([cumulative[:, s] * denominator - totals * int(share * denominator)
                      for s, share in enumerate(shares)], axis=1)
    step, survey = np.unravel_index(np.argmax(np.abs(error).astype(float)), error.shape)
    return float(Fraction(abs(int(error[step, survey])), denominator)), int(step), int(survey)


def _expected(mix: MixConfig, first: int, num_steps: int) -> dict[str, Any]:
    """Each inspected step's allowed counts (floor and ceil of B x its share) and the exact target totals."""
    batch_size = mix.global_batch_size
    if mix.schedule is None:
        shares = [exact_ratios(mix.ratios)[n] for n in mix.ratios]
        floors = np.array([[math.floor(batch_size * r) for r in shares]] * num_steps, np.int64).reshape(num_steps, -1)
        ceils = np.array([[math.ceil(batch_size * r) for r in shares]] * num_steps, np.int64).reshape(num_steps, -1)
        return {"floors": floors, "ceils": ceils, "total": [r * batch_size * num_steps for r in shares]}
    floors, ceils = batch_bounds(mix.schedule, batch_size, first, first + num_steps)
    total = [sum((batch_size * mix.schedule.shares_at(t)[s] for t in range(first, first + num_steps)), Fraction(0))
             for s in range(len(mix.schedule.names))]
    return {"floors": floors, "ceils": ceils, "total": total}


def _schedule_drift(mix: MixConfig, first: int, before: np.ndarray, counts: np.ndarray) -> tuple[float, int, int | None]:
    """Max |running total - the schedule's integral from global step 0| over the epoch's steps up to the last
    inspected one: (samples, step it ends, survey index)."""
    rows = np.concatenate([before, counts])
    if not len(rows):
        return 0.0, -1, None
    worst = schedule_drift(mix.schedule, mix.global_batch_size, rows, first)
    survey = max(range(len(worst)), key=lambda s: worst[s][0])
    return float(worst[survey][0]), worst[survey][1], survey


def _rank_count_range(ranks: np.ndarray, names: list[str]) -> dict[str, list[int]]:
    """Per survey, the fewest and most samples any rank's slice of any inspected batch holds."""
    per_slice = np.stack([(ranks[..., 0] == s).sum(axis=2) for s in range(len(names))], axis=-1)
    return {n: [int(per_slice[..., s].min()), int(per_slice[..., s].max())] if per_slice.size else [0, 0]
            for s, n in enumerate(names)}


def _rank_overlap(surveys: list[SurveyShards], ranks: np.ndarray) -> int:
    """Samples read by more than one rank (each counted once per extra rank that reads it)."""
    survey_offsets = np.cumsum([0] + [s.num_samples for s in surveys])
    unique_per_rank = []
    for rows in ranks.reshape(ranks.shape[0], -1, 3):  # a sample's id: its row over all surveys' shards
        shard_start = np.array([surveys[s].shard_starts[shard] for s, shard in rows[:, :2].tolist()], np.int64)
        unique_per_rank.append(np.unique(survey_offsets[rows[:, 0]] + shard_start + rows[:, 2]))
    return int(sum(len(u) for u in unique_per_rank) - len(np.unique(np.concatenate(unique_per_rank))))


def _problems(report: dict[str, Any]) -> list[str]:
    problems = []
    if not report["counts_within_floor_ceil"]:
        problems.append("a step's survey count is not floor or ceil of ratio x global batch size")
    if report["max_drift"] >= 1 or report["epoch_max_drift"] >= 1:
        problems.append(f"a running total drifts {max(report['max_drift'], report['epoch_max_drift']):.3f} "
                        "samples (>= 1) from its target")
    if report["duplicates"] and not report["duplicates_allowed"]:
        problems.append(f"{report['duplicates']} duplicate samples in the epoch although on_exhausted=stop")
    if report["rank_overlap"] > (report["duplicates"] if report["duplicates_allowed"] else 0):
        problems.append(f"{report['rank_overlap']} samples are read by two ranks in the same epoch")
    if not _batches_ok(report):
        problems.append(f"ranks do not all get the {report['epoch_batches'] - report['resume_from_step']} "
                        f"remaining batches of the epoch: {report['batches_per_rank']}")
    if not report["matches_global_order"]:
        problems.append("the ranks' slices do not glue back into the world-size-independent global order")
    return problems


def _batches_ok(report: dict[str, Any]) -> bool:
    remaining = report["epoch_batches"] - report["resume_from_step"]
    return set(report["batches_per_rank"]) == {remaining}


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: header, count table, totals vs target, checks, verdict."""
    names, steps = report["surveys"], report["steps"]
    batch_size, world = report["global_batch_size"], report["world_size"]
    first = report["resume_from_step"]
    last = first + len(steps) - 1
    lines = [
        (f"mix schedule {report['schedule']['text']}" if report.get("schedule") else
         f"mix {', '.join(f'{n}={r:g}' for n, r in report['ratios'].items())}") + f"   global batch {batch_size} = "
        f"{world} rank(s) x {report['batch_size_per_rank']}   seed {report['seed']}, epoch {report['epoch']}, "
        f"on_exhausted={report['on_exhausted']}",
        "train samples: " + ", ".join(f"{n} {c}" for n, c in report["split_samples"].items()),
        f"epoch: {report['epoch_batches']} global batches ({report['epoch_batches'] * batch_size} samples); "
        f"inspecting steps {first}..{last}" + (f" (resumed from a sampler state at step {first})" if first else "")
        + (f"; --steps {report['steps_requested']} cut at the epoch end" if len(steps) < report["steps_requested"]
           else ""),
        "", *_count_table(report), "",
        f"totals over steps {first}..{last} ({(last - first + 1) * batch_size} samples):",
        f"  {'survey':<10}{'got':>7}{'target':>10}{'diff':>9}",
    ]
    for name in names:
        got, target = report["totals"][name], report["target_totals"][name]
        lines.append(f"  {name:<10}{got:>7}{target:>10.2f}{got - target:>+9.2f}")
    lines += ["", *_check_lines(report)]
    if "grid" in report:
        grid = report["grid"]
        lines.append(f"grid: {grid['path']} ({grid['num_tiles']} tiles of step {grid['step']}); loader keys match "
                     f"the sampler's: {'ok' if grid['keys_match_sampler'] else 'no (unreadable samples replaced?)'}")
    lines += ["",
              "verdict: " + ("OK, the mix is exact and every rank reads its own slice" if report["ok"]
                             else "PROBLEM: " + "; ".join(report["problems"]))]
    return "\n".join(lines)


def _count_table(report: dict[str, Any]) -> list[str]:
    names, steps = report["surveys"], report["steps"]
    width = max(7, *(len(n) + 2 for n in names))
    row = lambda label, values: f"{label:>8}" + "".join(f"{v:>{width}}" for v in values)  # noqa: E731
    lines = [row("step", names)]
    lines += [row(s["step"], [s["counts"][n] for n in names]) for s in steps[:NUM_TABLE_STEPS]]
    if len(steps) > NUM_TABLE_STEPS:
        lines.append(row("...", ["..."] * len(names)))
    lines.append(row("min", [report["count_range"][n][0] for n in names]))
    lines.append(row("max", [report["count_range"][n][1] for n in names]))
    lines.append(row("target", [f"{report['targets'][n]:.2f}" for n in names]))
    per_rank = ", ".join(f"{n} {lo}..{hi}" for n, (lo, hi) in report["rank_count_range"].items())
    lines.append(f"per-rank slice of {report['batch_size_per_rank']}: {per_rank}")
    return lines


def _check_lines(report: dict[str, Any]) -> list[str]:
    mark = lambda good: "ok" if good else "FAIL"  # noqa: E731
    stop = not report["duplicates_allowed"]
    where = (f" ({report['max_drift_survey']} after step {report['max_drift_step']})"
             if report["max_drift_survey"] is not None else "")
    per_rank = report["batches_per_rank"]
    return [
        f"counts per step are floor/ceil of ratio x {report['global_batch_size']}: "
        f"{mark(report['counts_within_floor_ceil'])}",
        f"max drift of a running total from its target: {report['max_drift']:.3f} samples{where}; "
        f"whole epoch {report['epoch_max_drift']:.3f} (must be < 1): "
        f"{mark(max(report['max_drift'], report['epoch_max_drift']) < 1)}",
        f"duplicates within the epoch: {report['duplicates']} ({report['duplicates_in_steps']} in the inspected "
        f"steps); on_exhausted={report['on_exhausted']} {'allows none' if stop else 'allows them'}: "
        f"{mark(not (stop and report['duplicates']))}",
        f"rank disjointness: {report['rank_overlap']} samples read by two ranks (steps "
        f"{report['resume_from_step']}..{report['epoch_batches'] - 1})"
        f"{'' if stop else ', repeats of a sample may land on another rank'}: "
        f"{mark(report['rank_overlap'] <= (0 if stop else report['duplicates']))}",
        f"batches per rank: {per_rank[0] if len(set(per_rank)) == 1 else per_rank} on each of "
        f"{report['world_size']} rank(s): {mark(_batches_ok(report))}",
        f"ranks' slices glue into the world-size-independent global order: {mark(report['matches_global_order'])}",
    ]


if __name__ == "__main__":
    sys.exit(main())
