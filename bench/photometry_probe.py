"""Benchmark baseline: how far photometry alone goes on the SSL benchmark's labels (issue 17).

A ridge probe (bench/ssl_bench.py's: per survey, fitted on the train split, alpha chosen on val, scored on test with
a 95% bootstrap interval) on 17 numbers measured from each cutout as the models see it (64 px, unnormalised):
eval.image_stats' sky, noise, aperture S/N and adaptive-moment size; the per-band light (log) and the three colours;
the inner-minus-outer g-r colour gradient; the growth curve (light within 4, 8, 16 and 24 px of the centre over
the total); second-moment ellipticity; the peak. A frozen backbone whose features a ridge probe reads worse than
these has not learned even what a photometric catalog knows about the galaxies.

With --mlp, each is also read by the same MLP (bench.probes.mlp_probe: the base model's head widths, epoch chosen on
val), so that a nonlinear read of a backbone's features is compared with a nonlinear read of the photometry. With
--joint, also by one MLP fitted on the three surveys' train splits together (bench.probes.joint_mlp_probe), as the
SSL benchmark's MLP head stage reads a backbone on the mix: the two inputs then have the same reader.

    python bench/photometry_probe.py --shards runs/bench_ssl/shards \\
        --backbone ssl=runs/bench_ssl/runs/ssl/export/backbone --backbone random=runs/bench_ssl/runs/random_backbone
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402
from bench.probes import (eval_input, features, joint_mlp_probe, mlp_probe, ridge_predictions, ridge_probe,  # noqa: E402
                          score)
from bench.ssl_targets import LABELLED  # noqa: E402


def photometry(images: np.ndarray) -> np.ndarray:
    """(n, 17) photometric numbers of (n, 3, S, S) cutouts in 0..255 display levels."""
    from eval.image_stats import image_stats
    stats = image_stats(images)
    n, _, size, _ = images.shape
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    radius = np.hypot(xx, yy)
    light = np.clip(images - stats["sky"][:, None, None, None], 0, None)
    band = light.sum(axis=(2, 3)) + 1e-3
    grey = light.sum(axis=1)
    total = grey.sum(axis=(1, 2)) + 1e-3
    growth = [(grey * (radius < r)).sum(axis=(1, 2)) / total for r in (4, 8, 16, 24)]
    moment = {k: (grey * w).sum(axis=(1, 2)) / total for k, w in (("xx", xx * xx), ("yy", yy * yy), ("xy", xx * yy))}
    ellipticity = np.hypot(moment["xx"] - moment["yy"], 2 * moment["xy"]) / (moment["xx"] + moment["yy"] + 1e-6)
    inner = (light * (radius < 6)).sum(axis=(2, 3)) + 1e-3
    outer = (light * ((radius >= 6) & (radius < 20))).sum(axis=(2, 3)) + 1e-3
    gradient = np.log(inner[:, 0] / inner[:, 1]) - np.log(outer[:, 0] / outer[:, 1])
    colours = [np.log(band[:, i] / band[:, j]) for i, j in ((0, 1), (1, 2), (0, 2))]
    columns = [stats["sky"], stats["noise"], np.log(np.clip(stats["snr"], 1e-3, None)), stats["size"],
               *np.log(band).T, *colours, gradient, *growth, ellipticity, np.log(grey.max(axis=(1, 2)) + 1e-3)]
    return np.nan_to_num(np.stack(columns, axis=1))


def split_photometry(shards: Path, survey: str, split: str) -> tuple[list[str], dict[str, np.ndarray]]:
    from eval.image_stats import unnormalise
    from loaders.evaluation import iter_eval_batches
    cfg = eval_input(shards)
    keys, out = [], []
    for batch in iter_eval_batches(cfg, survey, split, batch_size=256, max_samples=None):
        out.append(photometry(unnormalise(batch.images.numpy(), cfg.mean, cfg.std)))
        keys += batch.keys
    return keys, {"photometry": np.concatenate(out)}


def joint_arms(photometry_of: dict, backbones: dict[str, str], args: argparse.Namespace) -> dict[str, tuple]:
    """{name: ({survey: test keys}, {survey: predictions})} of one MLP per input fitted on the three surveys."""
    inputs = {"photometry": photometry_of}
    for name, folder in backbones.items():
        inputs[name] = {survey: (lambda split, survey=survey, folder=folder:
                                 features(Path(folder), args.shards, survey, split)) for survey in LABELLED}
    return {name: joint_mlp_probe(of, args.shards, args.seed)[:2] for name, of in inputs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=REPO / "runs" / "bench_ssl" / "shards",
                        help="labelled shard root (bench/ssl_bench.py's <out>/shards)")
    parser.add_argument("--backbone", action="append", default=[], metavar="NAME=DIR",
                        help="also a frozen backbone folder's ridge probe (ssl_bench's), paired with photometry; "
                             "repeatable, e.g. ssl=runs/bench_ssl/runs/ssl/export/backbone")
    parser.add_argument("--mlp", action="store_true",
                        help="also an MLP probe of the photometry and of each backbone, paired the same way")
    parser.add_argument("--joint", action="store_true",
                        help="also one MLP fitted on the three surveys together, of the photometry and of each "
                             "backbone, paired the same way")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "photometry_probe.json")
    args = parser.parse_args(argv)
    if not all((args.shards / s / "labels.parquet").is_file() for s in LABELLED):
        raise SystemExit(f"error: {args.shards} lacks the labelled surveys {LABELLED}; run bench/ssl_bench.py first "
                         "or pass --shards")
    backbones = dict(item.split("=", 1) for item in args.backbone)
    photometry_of = {survey: functools.cache(lambda split, survey=survey: split_photometry(args.shards, survey, split))
                     for survey in LABELLED}
    joint = joint_arms(photometry_of, backbones, args) if args.joint else {}
    rows = []
    for survey in LABELLED:
        photometry = photometry_of[survey]
        keys, pred, choice = ridge_probe(photometry, args.shards, survey)
        arms = {"ridge photometry": (keys, pred)}
        arms.update({f"ridge {name}": ridge_predictions(Path(folder), args.shards, survey)[:2]
                     for name, folder in backbones.items()})
        pairs = [(f"ridge {name}", "ridge photometry") for name in backbones]
        if args.mlp:
            arms["mlp photometry"] = mlp_probe(photometry, args.shards, survey, args.seed)[:2]
            for name, folder in backbones.items():
                arms[f"mlp {name}"] = mlp_probe(lambda split: features(Path(folder), args.shards, survey, split),
                                                args.shards, survey, args.seed)[:2]
                pairs.append((f"mlp {name}", "mlp photometry"))
        for name, (keys_of, preds_of) in joint.items():
            arms[f"joint {name}"] = (keys_of[survey], preds_of[survey])
            if name != "photometry":
                pairs.append((f"joint {name}", "joint photometry"))
        row = score(arms, args.shards, survey, "test", pairs, args)
        rows.append({**row, "alpha": choice["alpha"]})
        cells = "  ".join(f"{name} {v['r']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for name, v in row["arms"].items())
        print(f"{survey} (n = {row['n']}, photometry alpha {choice['alpha']:g}): {cells}", flush=True)
        for pair in row["pairs"]:
            print(f"    {pair['a']} - {pair['b']}: {pair['r']:+.3f} [{pair['lo']:+.3f}, {pair['hi']:+.3f}]")
    write_report(args.json, "photometry_probe", rows, settings={k: str(v) for k, v in vars(args).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
