r"""The 10%-label comparison with each arm at its best validation step (early stopping), per sky and pooled (issue 17).

The SSL benchmark fine-tunes every arm for a fixed 1,000 steps. With ~120 labelled galaxies per survey a model
trained from scratch can overfit long before that, and a user would keep the step its val split liked best; then the
gain of SSL over scratch is measured against a scratch arm that did not overfit. This reads fine-tunings run with a
validation and a checkpoint every N steps (`val_every=100 checkpoint_every=100 keep_checkpoints=10`; otherwise the
benchmark's runs, so at their last step they are the benchmark's models), picks each run's step by its mean val r over
sdss, decals and hst (the earliest of ties), and scores the test split at that step and at the last: per sky, and
pooled over skies as bench/ssl_skies.py pools them (each sky bootstrapped over its own test galaxies with its seed,
the resamples averaged). Trains nothing.

    python bench/ssl_early.py runs/bench_ssl_s2 runs/bench_ssl_s3 --run "ssl lpft=x_es_lpft" --run scratch=x_es_scratch
    python bench/ssl_early.py runs/bench_ssl_s2 --run "ssl lpft jit=x_jit_lpft" --run "scratch jit=x_jit_scratch" \
        --run "ssl lpft=x_es_lpft" --run scratch=x_es_scratch     # both arms with and without a change

A checkpoint's weights are read as the export reads them (train.engine.saved_weights: the fp32 masters gathered
from ZeRO 1-3 partitions; under ZeRO 0, fp32 runs only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.probes import model_predictions, print_rows, sky_rows  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.ssl_targets import LABELLED  # noqa: E402

GAIN_TARGET = 0.05


def val_curve(run: Path) -> dict[int, float]:
    """{step: mean over sdss, decals and hst of the val split's mean r} from a run's log.jsonl."""
    curve = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "validation" and set(LABELLED) <= set(event["surveys"]):
            curve[int(event["step"])] = float(np.mean([event["surveys"][s]["r"] for s in LABELLED]))
    if not curve:
        raise ValueError(f"{run} logged no validation of {', '.join(LABELLED)}: run it with val_every=N (and "
                         "checkpoint_every=N keep_checkpoints=STEPS/N, so each validated step can be scored)")
    return curve


def best_step(curve: dict[int, float]) -> int:
    """The step with the highest val r; the earliest of ties (fewer steps for the same val)."""
    return min(curve, key=lambda step: (-curve[step], step))


def model_at(run: Path, step: int) -> torch.nn.Module:
    """The run's model with its weights at `step`: the export's architecture, the checkpoint's parameters."""
    from models.io import load_export
    from train.checkpoint import checkpoint_root, tag_for
    from train.engine import saved_weights
    from train.publish import is_complete
    folder = checkpoint_root(run) / tag_for(step)
    if not is_complete(folder):
        raise ValueError(f"{run} has no complete checkpoint of step {step} ({folder}): its step was chosen on val, so "
                         "run it with checkpoint_every equal to val_every and keep_checkpoints large enough to keep "
                         "them all")
    model = load_export(run / "export")
    model.load_state_dict(saved_weights(folder.parent, folder.name), strict=True)
    return model.eval()


def sky_seed(out: Path, runs: dict[str, str]) -> int:
    from train.config import load_train_config
    seeds = {load_train_config(out / "runs" / run / "config.yaml").seed for run in runs.values()}
    if len(seeds) != 1:
        raise ValueError(f"{out}: the runs {sorted(runs.values())} ran with seeds {sorted(seeds)}; pair runs of one sky")
    return seeds.pop()


def sky_arms(out: Path, runs: dict[str, str], steps: dict[str, int]) -> dict[str, dict[str, tuple]]:
    """{survey: {arm: (keys, predictions)}}: each run at its chosen step ("<name> best") and last ("<name> last")."""
    from models.io import load_export
    arms = {survey: {} for survey in LABELLED}
    for name, run in runs.items():
        folder = out / "runs" / run
        models = {"best": model_at(folder, steps[name]), "last": load_export(folder / "export")}
        for survey in LABELLED:
            for when, model in models.items():
                arms[survey][f"{name} {when}"] = model_predictions(folder, out / "shards", survey, "test", model)
    return arms


def pairs_of(names: list[str]) -> list[tuple[str, str]]:
    """The first arm against the second at the chosen and at the last steps; with four, the third against the fourth
    too (the same comparison under another setting), and at the last step each of the first two against its twin
    among the last two; then each arm's chosen step against its last."""
    first, second = names[:2]
    pairs = [(f"{first} best", f"{second} best"), (f"{first} last", f"{second} last")]
    if len(names) == 4:
        third, fourth = names[2:]
        pairs += [(f"{third} best", f"{fourth} best"), (f"{third} last", f"{fourth} last"),
                  (f"{first} last", f"{third} last"), (f"{second} last", f"{fourth} last")]
    return [*pairs, *((f"{name} best", f"{name} last") for name in names)]


def pool(outs: list[Path], runs: dict[str, str], num_resamples: int) -> tuple[list[dict], dict]:
    """Rows per survey (each sky, then pooled when there are several) and each run's chosen step per sky."""
    chosen, arms_of, seeds = {}, {}, [sky_seed(out, runs) for out in outs]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"skies {[str(o) for o in outs]} ran with seeds {seeds}: pool different skies")
    for out, seed in zip(outs, seeds):
        curves = {name: val_curve(out / "runs" / run) for name, run in runs.items()}
        steps = {name: best_step(curve) for name, curve in curves.items()}
        chosen[seed] = {name: {"step": steps[name], "val_r": curves[name][steps[name]],
                               "last": max(curves[name]), "val_r_last": curves[name][max(curves[name])]}
                        for name in runs}
        arms_of[seed] = sky_arms(out, runs, steps)
    rows = [row for survey in LABELLED for row in sky_rows(
        [(seed, out / "shards", arms_of[seed][survey]) for out, seed in zip(outs, seeds)], survey, pairs_of(list(runs)),
        num_resamples)]
    order = [*seeds, "pooled"]
    rows.sort(key=lambda row: order.index(row["sky"]))  # stable: each sky's surveys together, as the table reads
    for row in rows:
        row["met"] = {f"10pct at {when}": gain["r"] >= GAIN_TARGET and gain["lo"] > 0
                      for when, gain in zip(("the best val steps", "the last step"), row["pairs"])}
    return rows, chosen


def parse_runs(specs: list[str]) -> dict[str, str]:
    runs = {}
    for spec in specs:
        name, sep, run = spec.partition("=")
        if not sep or not name.strip() or not run.strip():
            raise ValueError(f"--run {spec!r}: write NAME=RUN, e.g. 'ssl lpft=x_es_lpft' (RUN under each OUT/runs)")
        runs[name.strip()] = run.strip()
    if len(runs) not in (2, 4):
        raise ValueError("give two --run (the arm first, then what it is compared with, e.g. scratch), or four (the "
                         "same two under a second setting after them)")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outs", nargs="+", type=Path, metavar="OUT", help="bench/ssl_bench.py --out folders (skies)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN",
                        help="an arm and its run under each OUT/runs; the first is compared with the second, a "
                             "third with a fourth, and each of the first two with its twin among the last two "
                             "(default: 'ssl lpft=x_es_lpft' and 'scratch=x_es_scratch')")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per sky")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "ssl_early.json")
    args = parser.parse_args(argv)
    runs = parse_runs(args.run or ["ssl lpft=x_es_lpft", "scratch=x_es_scratch"])
    torch.set_num_threads(2)
    rows, chosen = pool([out.resolve() for out in args.outs], runs, args.bootstrap)
    print("\nsteps chosen on val (mean val r over sdss, decals, hst):")
    for seed, steps in chosen.items():
        cells = "  ".join(f"{name}: step {c['step']} ({c['val_r']:.3f}; last {c['last']}: {c['val_r_last']:.3f})"
                          for name, c in steps.items())
        print(f"  sky {seed}: {cells}")
    print_rows("each arm at its best val step and at its last: mean r on the test split", rows)
    first, second = list(runs)[:2]
    print(f"\ntarget: {first} - {second} >= {GAIN_TARGET}, interval above 0 (each at its best val step; at the last)")
    for row in rows:
        cells = "  ".join(f"{name}: {'met' if met else 'NOT met':8s}" for name, met in row["met"].items())
        print(f"  {row['survey']:7s} sky {row['sky']!s:7s} {cells}")
    write_report(args.json, "ssl_early", rows, settings={"outs": [str(o) for o in args.outs], "runs": runs,
                                                         "bootstrap": args.bootstrap,
                                                         "steps": {str(k): v for k, v in chosen.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
