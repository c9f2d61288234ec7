"""The SSL benchmark's two targets on several mock skies, each sky's and pooled (issue 17).

Every folder given is a bench/ssl_bench.py --out on one mock sky (its --seed); each needs the runs the two targets
compare (`--targets` makes just those). Per survey it prints each sky's frozen ridge probe and MLP head stage (SSL
and random) and head-first fine-tuning against scratch with 10% of the labels, then the mean over skies: each sky
bootstrapped over its own test galaxies (the seed of its runs), the skies' resamples averaged, so the pooled interval
is a stratified bootstrap over skies that are independent draws of the mock. Reads the kept runs; trains nothing.

    python bench/ssl_bench.py --out runs/bench_ssl_s2 --seed 2 --targets    # a new sky: ~20 min
    python bench/ssl_skies.py runs/bench_ssl runs/bench_ssl_s1 runs/bench_ssl_s2
    python bench/ssl_skies.py runs/bench_ssl_s3 runs/bench_ssl --recipe viewpx    # another arm judged
    python bench/ssl_skies.py runs/bench_ssl_s3 runs/bench_ssl --also ssl_viewpx --also ft_viewpx_10pct_lpft  # paired
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.probes import print_rows, sky_rows  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.ssl_targets import LABELLED, TARGET_PAIRS, target_arms, target_runs  # noqa: E402

FROZEN_TARGET, GAIN_TARGET = 0.30, 0.05


def needed(runs: dict[str, str]) -> list[str]:
    """The folders the target arms read; a fine-tuning run counts once its export exists (a folder without one may
    still be training)."""
    return [run if arm.startswith("ridge ") else f"{run}/export" for arm, run in runs.items()]


def runs_and_pairs(recipe: str = "ssl", also: list[str] = ()) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """What each arm reads under a sky's runs/ (the targets', with `recipe`'s SSL arm as "ssl", and each --also run),
    and the pairs compared: the targets', then each --also run against its target arm - an SSL run's ridge probe
    ("ssl_long" -> "ridge long") against the recipe's, a fine-tuning run (ft_...) against head-first 10%."""
    runs, pairs = target_runs(recipe), list(TARGET_PAIRS)
    for run in also:
        arm, against = (run, "ssl lpft 10pct") if run.startswith("ft_") else (extra_arm(run), "ridge ssl")
        if arm in runs:  # the recipe's own run beside another judged arm: "ssl" under --recipe long
            arm = f"{arm} (--also {run})"
        runs[arm] = run if run.startswith("ft_") else f"{run}/export/backbone"
        pairs.append((arm, against))
    return runs, pairs


def sky_seed(out: Path, recipe: str = "ssl", runs: dict[str, str] | None = None) -> int:
    """The seed the benchmark ran this sky with (its runs' seed, which is also its bootstrap seed), once every run
    the arms read is there."""
    runs = runs or target_runs(recipe)
    missing = [run for run in needed(runs) if not (out / "runs" / run).is_dir()]
    targets = set(needed(target_runs(recipe)))
    if missing and targets.intersection(missing):
        how = "--targets" if recipe == "ssl" else f"the {recipe!r} arm (--long-ssl-steps or --variant)"
        raise ValueError(f"{out} has no {', '.join(missing)} under runs/: run `python bench/ssl_bench.py --out {out} "
                         f"--seed N` with {how} (N: the sky) first")
    if missing:
        raise ValueError(f"{out} has no {', '.join(missing)} under runs/: run the arms of bench/ssl_bench.py that "
                         "make them on this sky first, or drop them from --also")
    from train.config import load_train_config
    return load_train_config(out / "runs" / "ssl" / "config.yaml").seed


def verdict(row: dict) -> dict:
    """Whether a row meets the two targets: frozen features >= 0.30 by the SSL ridge probe, and by the SSL MLP head
    stage with its lead over the same head on a random backbone's features above 0 (the interval); the 10% gain
    >= 0.05 with its interval above 0."""
    pair = {p["a"]: p for p in row["pairs"]}
    mlp, gain = pair["mlp ssl"], pair["ssl lpft 10pct"]
    return {"frozen": row["arms"]["ridge ssl"]["r"] >= FROZEN_TARGET,
            "frozen mlp": row["arms"]["mlp ssl"]["r"] >= FROZEN_TARGET and mlp["lo"] > 0,
            "10pct": gain["r"] >= GAIN_TARGET and gain["lo"] > 0}


def extra_arm(run: str) -> str:
    """The arm name of another SSL run's frozen probe: "ssl_long" -> "ridge long"."""
    return f"ridge {run.removeprefix('ssl_')}"


def pool(outs: list[Path], num_resamples: int, extra: list[str] = (), recipe: str = "ssl") -> list[dict]:
    runs, pairs = runs_and_pairs(recipe, extra)
    seeds = [sky_seed(out, recipe, runs) for out in outs]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"skies {[str(o) for o in outs]} ran with seeds {seeds}: pool different skies (--seed)")
    rows = []
    for survey in LABELLED:
        skies = [(seed, out / "shards", target_arms(out, survey, runs)) for out, seed in zip(outs, seeds)]
        rows += [{**row, "met": verdict(row)} for row in sky_rows(skies, survey, pairs, num_resamples)]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outs", nargs="+", type=Path, metavar="OUT", help="bench/ssl_bench.py --out folders")
    parser.add_argument("--also", action="append", default=[], metavar="RUN",
                        help="also pool this run under each OUT/runs, paired: an SSL run's frozen ridge probe (e.g. "
                             "ssl_long, ssl_nojitter) against the recipe's, a fine-tuning run (e.g. "
                             "ft_long_10pct_lpft) against the recipe's head-first 10%% (repeatable)")
    parser.add_argument("--recipe", default="ssl", metavar="ARM",
                        help="judge another SSL arm in the recipe's place: its ridge probe and head-first 10%% "
                             "fine-tuning (e.g. long: ssl_long, ft_long_10pct_lpft) against the same random backbone "
                             "and scratch run (default: ssl, ssl_cpu.yaml's run)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per sky")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "ssl_skies.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = pool([out.resolve() for out in args.outs], args.bootstrap, args.also, args.recipe)
    print_rows(f"the two targets per sky and pooled (recipe: {args.recipe}): mean r on the test split", rows)
    print(f"\ntargets: frozen: ridge ssl >= {FROZEN_TARGET}; frozen mlp: mlp ssl >= {FROZEN_TARGET} and mlp ssl - mlp "
          f"random interval above 0; 10%: ssl lpft 10pct - scratch 10pct >= {GAIN_TARGET}, interval above 0")
    for row in rows:
        cells = "  ".join(f"{name} {'met' if met else 'NOT met':8s}" for name, met in row["met"].items())
        print(f"  {row['survey']:7s} sky {row['sky']!s:7s} {cells}")
    write_report(args.json, "ssl_skies", rows, settings={"outs": [str(o) for o in args.outs], "also": args.also,
                                                         "recipe": args.recipe, "bootstrap": args.bootstrap})
    return 0


if __name__ == "__main__":
    sys.exit(main())
