"""`python -m launch.demo`: the original plan's held-out-survey study, end to end, on the embedded mock surveys."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from launch.slurm import torchrun_command
from sharding import build, mock, verify
from sharding.config import CONFIG_ROOT
from sharding.registry import load_survey
from sharding.schema import load_schema
from train.config import load_train_config
from train.stages import initial_export
from train.world import free_port

SURVEYS = ("sdss", "decals", "hst", "ukidss")
HELD_OUT = "ukidss"
MIXES = {"sdss_only": "sdss=1.0", "mixed": "sdss=0.33,decals=0.33,hst=0.34"}
QUICK = {"num_galaxies": 300, "train_steps": 150, "bootstrap": 300, "robust_galaxies": 48}
FULL = {"num_galaxies": 1500, "train_steps": 1000, "bootstrap": 1000, "robust_galaxies": 200}


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows a default only where there is one to show (None means "the preset's")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.demo", formatter_class=_Help,
        description="The original plan's experiment at small scale: mock SDSS, DECaLS, HST and UKIDSS surveys (with "
                    "a few corrupt inputs,\nrecorded in rejects.parquet), shards, the CPU recipe trained on SDSS only "
                    "and on the 33/33/34 SDSS/DECaLS/HST mix\n(same steps, torchrun), both models evaluated on their "
                    "surveys' test splits and on every galaxy of the held-out\nUKIDSS, the eval ood study and an HTML "
                    "report. Ends with the table and writes <out>/summary.json.\nRe-running continues where it "
                    "stopped (trained runs are kept).",
        epilog="examples:\n  python -m launch.demo                       # 1,500 galaxies per survey, 8-9 minutes on "
               "2 cores\n  python -m launch.demo --quick --out /tmp/d   # 300 galaxies, 150 steps: about 2 minutes\n"
               "  python -m launch.demo --seed 3 --out runs/demo_s3   # another draw of the surveys and the runs")
    parser.add_argument("--out", default="runs/demo", help="everything goes under this folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mock surveys and the training runs")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['num_galaxies']} galaxies per survey and "
                                                             f"{QUICK['train_steps']} steps: about 2 minutes")
    parser.add_argument("--num-galaxies", type=int, help=f"per mock survey (default {FULL['num_galaxies']}, "
                                                         f"{QUICK['num_galaxies']} with --quick)")
    parser.add_argument("--train-config", default=str(CONFIG_ROOT / "train" / "cpu.yaml"), help="the recipe")
    parser.add_argument("--train-steps", type=int, help=f"optimizer steps per run (default {FULL['train_steps']}, "
                                                        f"{QUICK['train_steps']} with --quick)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes per training run")
    parser.add_argument("--workers", type=int, default=2, help="processes for the mock surveys and sharding")
    parser.add_argument("--corrupt-fraction", type=float, default=0.02, help="share of deliberately bad inputs")
    parser.add_argument("--bootstrap", type=int, help=f"bootstrap resamples of every interval (default "
                                                      f"{FULL['bootstrap']}, {QUICK['bootstrap']} with --quick)")
    return parser.parse_args(argv)


_STARTED = time.perf_counter()


def _step(title: str) -> None:
    """A stage banner with the time since the demo started, so a user sees where the minutes go."""
    elapsed = time.perf_counter() - _STARTED
    print(f"\n=== [{int(elapsed // 60)}:{int(elapsed % 60):02d}] {title} ===", flush=True)


def make_shards(out: Path, num_galaxies: int, args: argparse.Namespace) -> Path:
    shards = out / "shards"
    for name in SURVEYS:
        raw = out / "raw" / name
        _step(f"mock survey {name}: {num_galaxies} galaxies -> {raw}")
        if mock.main(["--survey", name, "--num-galaxies", str(num_galaxies), "--out", str(raw), "--seed",
                      str(args.seed), "--corrupt-fraction", str(args.corrupt_fraction), "--workers",
                      str(args.workers), "--overwrite", "--no-progress"]):
            raise RuntimeError(f"mock survey {name} failed")
        _step(f"shard {name} -> {shards / name}")
        # A re-run regenerates identical mock files, and the build then finds nothing to do.
        if build.main(["--survey", name, "--catalog", str(raw / Path(load_survey(name).catalog).name),
                       "--images", str(raw / "images"), "--out", str(shards), "--workers", str(args.workers),
                       "--no-progress"]):
            raise RuntimeError(f"sharding {name} failed")
    _step(f"verify {shards}, and that no galaxy is in one split in one survey and another split in another")
    if verify.main([str(shards), "--across", str(shards)]):
        raise RuntimeError(f"{shards} failed verification")
    return shards


def train_run(name: str, mix: str, shards: Path, out: Path, args: argparse.Namespace, steps: int | None) -> Path:
    """One recipe run under torchrun; --resume auto makes a re-run of the demo continue, not restart."""
    run_dir = out / "runs" / name
    overrides = [f"data.mix={mix}", f"data.loader.shard_root={shards}", f"seed={args.seed}"]
    if steps is not None:
        overrides.append(f"max_steps={steps}")
    if (run_dir / "export" / "export.json").is_file():
        print(f"{name}: already trained ({run_dir / 'export'})")
        return run_dir
    _step(f"train {name} ({mix}) with {Path(args.train_config).name}: torchrun, {args.nproc} CPU processes "
          f"-> {run_dir}")
    cmd = torchrun_command(sys.executable, args.nproc, ["--config", args.train_config, "--out-dir", str(run_dir),
                                                        "--resume", "auto", *overrides], master_port=free_port())
    if subprocess.call(cmd):
        raise RuntimeError(f"training {name} failed; its log is {run_dir / 'log.jsonl'}")
    return run_dir


def untrained(shards: Path, out: Path, args: argparse.Namespace) -> Path:
    """The mixed run's initial weights: the baseline that shows what training added."""
    folder = out / "runs" / "untrained" / "export"
    if not (folder / "export.json").is_file():
        cfg = load_train_config(args.train_config, [f"data.mix={MIXES['mixed']}", f"data.loader.shard_root={shards}",
                                                    f"seed={args.seed}"])
        initial_export(cfg, load_schema(), folder)
    return folder.parent


def evaluate(runs: dict[str, Path], shards: Path, out: Path, bootstrap: int, robust_galaxies: int) -> dict:
    from eval import ood, report, robustness, score, source as sources
    from eval.infer import has_dropout

    _step(f"eval ood: {', '.join(runs)} on every {HELD_OUT} galaxy and on their training surveys' test splits")
    cfg = ood.OODConfig(runs={k: str(v) for k, v in runs.items()}, held_out=HELD_OUT, shards=str(shards),
                        out=str(out / "eval" / "ood"), bootstrap=bootstrap)
    study = ood.run_study(cfg, quiet=True)
    (out / "eval" / "ood" / "ood.json").write_text(json.dumps(study, indent=2) + "\n")
    agreement = agree_step(study, shards, out, bootstrap)
    _step("eval metrics, robustness and the report")
    reports = []
    for name in ("mixed", "sdss_only"):
        path = out / "eval" / f"{name}_{HELD_OUT}.json"
        score.write_json(score.score(study["runs"][name]["preds"][HELD_OUT], shards, bootstrap), str(path))
        reports.append(path)
    robust_dir = out / "eval" / "robustness"
    source = sources.open_source(runs["mixed"])
    mc = ["--mc-samples", "10"] if has_dropout(sources.load_model(source)) else []  # calibration needs dropout
    robust_args = robustness.parse_args(["--model", str(runs["mixed"]), "--shards", str(shards), "--survey", "sdss",
                                         "--max-galaxies", str(robust_galaxies), "--bootstrap",
                                         str(min(bootstrap, 300)), "--out", str(robust_dir), *mc])
    robust = robustness.run(robust_args, log=lambda *_: None, progress=False)
    robust["plots"] = robustness.write_plots(robust, robust_dir)
    score.write_json(robust, str(robust_dir / "robustness.json"))
    page = out / "report.html"
    page.write_text(report.build_report([str(p) for p in [out / "eval" / "ood" / "ood.json", *reports, agreement,
                                                          robust_dir / "robustness.json"]]))
    return study


def agree_step(study: dict, shards: Path, out: Path, bootstrap: int) -> Path:
    """The mixed model's answers for the same galaxy in two surveys, on galaxies it never trained on in any survey:
    SDSS and DECaLS test splits (sky splits keep twins together) and all of UKIDSS."""
    from eval import agree, match

    _step("eval match and agree: does the mixed model give a galaxy the same answers in SDSS, DECaLS and UKIDSS?")
    pairs, result = out / "eval" / "pairs.parquet", out / "eval" / "agree.json"
    if match.main(["--shards", str(shards), "--surveys", f"sdss,decals,{HELD_OUT}", "--out", str(pairs)]):
        raise RuntimeError("eval match failed")
    preds = study["runs"]["mixed"]["preds"]
    if agree.main(["--pairs", str(pairs), "--predictions", preds["sdss"], preds["decals"], preds[HELD_OUT],
                   "--out", str(result), "--plot", str(out / "eval" / "agree.png"), "--bootstrap", str(bootstrap)]):
        raise RuntimeError("eval agree failed")
    return result


def print_table(study: dict) -> None:
    cell = lambda m: f"{m['r']:.3f} [{m['r_ci'][0]:.3f}, {m['r_ci'][1]:.3f}]"  # noqa: E731
    columns = ["sdss", "decals", "hst"]
    print(f"\nmean Pearson r over {len(study['features'])} features [95% bootstrap interval]; test splits, and every "
          f"{HELD_OUT} galaxy ({study['n']}), which no run trained on")
    print(f"{'run':<11}" + "".join(f"{c:>26}" for c in columns) + f"{HELD_OUT + ' (held out)':>28}")
    for name, run in study["runs"].items():
        ind = run["in_distribution"]["surveys"]
        row = "".join(f"{cell(ind[c]['mean']) if c in ind else '-':>26}" for c in columns)
        print(f"{name:<11}{row}{cell(run['mean']):>28}")
    print(f"\n{HELD_OUT} (held out) split by whether the galaxy has a twin (within {study['twin_radius_arcsec']:g} "
          f"arcsec) in the run's training surveys' train splits")
    print(f"{'run':<11}{'new galaxies':>34}{'with a training twin':>34}")
    for name, run in study["runs"].items():
        print(f"{name:<11}" + "".join(f"{_subset(run['subsets'][k]):>34}" for k in ("new", "twin")))
    for pair in study["pairs"]:
        r = pair["r"]
        print(f"{pair['a']} - {pair['b']} on {HELD_OUT}: r {r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] "
              f"(paired bootstrap; P(> 0) = {r['p_gt0']:.2f})")
        new = pair["subsets"]["new"]
        if new["diff"] is not None:
            print(f"  on the {new['n']} new galaxies: r {new['diff']:+.3f} [{new['ci'][0]:+.3f}, {new['ci'][1]:+.3f}]"
                  f" (P(> 0) = {new['p_gt0']:.2f})")


def _subset(sub: dict) -> str:
    if sub["r"] is None:
        return f"n={sub['n']}, too few"
    return f"{sub['r']:.3f} [{sub['r_ci'][0]:.3f}, {sub['r_ci'][1]:.3f}] n={sub['n']}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = QUICK if args.quick else FULL
    out = Path(args.out)
    global _STARTED
    started = _STARTED = time.perf_counter()
    try:
        shards = make_shards(out, args.num_galaxies or preset["num_galaxies"], args)
        steps = args.train_steps or preset["train_steps"]
        runs = {"untrained": untrained(shards, out, args)}
        runs.update({name: train_run(name, mix, shards, out, args, steps) for name, mix in MIXES.items()})
        study = evaluate(runs, shards, out, args.bootstrap or preset["bootstrap"], preset["robust_galaxies"])
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = {"shards": str(shards), "held_out": HELD_OUT, "report": str(out / "report.html"),
               "runs": {name: {"export": study["runs"][name]["export"], "preds": study["runs"][name]["preds"]}
                        for name in runs},
               "ood": study}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(study)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s: report {out / 'report.html'}, summary "
          f"{out / 'summary.json'}, runs under {out / 'runs'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
