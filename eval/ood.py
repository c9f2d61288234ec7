"""`python -m eval ood`: the held-out-survey study: several runs scored on a survey none of them trained on."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from eval import metrics as m, source as sources, twins
from eval.compare import common_features
from eval.labels import align, read_labels, read_predictions
from eval.score import cell, write_json
from sharding.config import load_config

EXAMPLES = """examples:
  python -m eval ood --runs sdss_only=runs/sdss_only mixed=runs/mixed --held-out ukidss --shards data/shards \\
      --out reports/ood
  python -m eval ood --config configs/eval/ood_demo.yaml
Writes <out>/ood.json, <out>/gain.png and the predictions under <out>/preds/<run>/<survey>.parquet."""
METRICS = ("r", "r2", "mae")


@dataclass(frozen=True)
class OODConfig:
    runs: dict[str, str] = field(default_factory=dict)  # name -> run folder or export
    held_out: str = "ukidss"
    shards: str = "data/shards"
    out: str = "reports/ood"
    held_out_split: str = "all"  # every galaxy of the held-out survey: none was trained on
    id_split: str = "test"  # each run's own training surveys, on galaxies it did not train on
    bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    twin_radius_arcsec: float = 1.0  # a held-out galaxy within this of a training-split galaxy is its twin


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval ood", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict every run on the held-out survey and on its own training surveys' test splits; report "
                    "overall and per-question r, R^2 and MAE with 95%% bootstrap intervals per run, the paired "
                    "differences between runs on the held-out survey, and each run's in-distribution -> held-out "
                    "drop; plot the per-question gain.")
    parser.add_argument("--config", help="a study YAML (configs/eval/*.yaml); flags override its values")
    parser.add_argument("--runs", nargs="+", metavar="NAME=RUN", help="runs (folders or exports) by name")
    parser.add_argument("--held-out", help="the survey none of the runs trained on")
    parser.add_argument("--shards", help="shard root")
    parser.add_argument("--out", help="output folder")
    for flag in ("held-out-split", "id-split"):
        parser.add_argument(f"--{flag}")
    for flag in ("bootstrap", "seed", "batch-size"):
        parser.add_argument(f"--{flag}", type=int)
    parser.add_argument("--twin-radius", dest="twin_radius_arcsec", type=float,
                        help="arcsec: a held-out galaxy this close to a galaxy of a run's training surveys' train "
                             "splits has a training twin; scores are also given on new galaxies and on twins "
                             "(default 1.0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def study_config(args: argparse.Namespace) -> OODConfig:
    cfg = load_config(OODConfig, args.config) if args.config else OODConfig()
    updates = {k: getattr(args, k) for k in ("held_out", "shards", "out", "held_out_split", "id_split", "bootstrap",
                                             "seed", "batch_size", "device", "twin_radius_arcsec") if getattr(args, k) is not None}
    if args.runs:
        pairs = [r.split("=", 1) for r in args.runs]
        if any(len(p) != 2 or not p[0] for p in pairs):
            raise ValueError(f"--runs takes NAME=RUN pairs, got {args.runs}")
        updates["runs"] = dict(pairs)
    cfg = replace(cfg, **updates)
    if not cfg.runs:
        raise ValueError("no runs: pass --runs NAME=RUN ... or a --config with runs")
    return cfg


def predictions(cfg: OODConfig, name: str, run: str, survey: str, split: str, quiet: bool) -> Path:
    """Predictions of one run on one survey split, reused only when made by the same weights on the same split."""
    from eval import predict

    return predict.cached_prediction(run, cfg.shards, survey, split, Path(cfg.out) / "preds" / name,
                                     batch_size=cfg.batch_size, device=cfg.device, quiet=quiet)


def _questions(labels, features: list[str]) -> dict[str, list[str]]:
    return {q: [f for f in fs if f in features] for q, fs in labels.questions.items() if any(f in features for f in fs)}


def held_out_scores(cfg: OODConfig, files: dict[str, Path], training: dict[str, list[str]]) -> dict:
    """Every run's held-out metrics on the galaxies all runs predicted, and the same on "new" galaxies (no twin in
    any of the run's training surveys' train splits) and on "twin" ones, with the paired run differences."""
    labels = read_labels(Path(cfg.shards), cfg.held_out)
    preds = {name: read_predictions(path) for name, path in files.items()}
    labelled = {c for c in labels.frame.columns if labels.frame[c].dtype.kind == "f" and labels.frame[c].notna().any()}
    features, dropped = common_features(preds, set(labels.frame.columns), labelled)
    aligned = {name: align(p.frame, features, labels, str(files[name])) for name, p in preds.items()}
    keys = sorted(set.intersection(*(set(a.keys) for a in aligned.values())))
    found: dict[tuple, set[str]] = {}
    for name, surveys in training.items():
        if tuple(surveys) not in found:
            found[tuple(surveys)] = twins.twin_keys(Path(cfg.shards), cfg.held_out, surveys, cfg.twin_radius_arcsec)
    twin_sets = {name: found[tuple(surveys)] for name, surveys in training.items()}
    rows = {}
    for name, a in aligned.items():
        position = {k: i for i, k in enumerate(a.keys)}
        rows[name] = np.array([position[k] for k in keys], dtype=np.int64)
    arrays = {name: a.pred[rows[name]] for name, a in aligned.items()}
    first = next(iter(aligned))
    target = aligned[first].target[rows[first]]
    # The labels' own mask (answers with enough votes), as in-distribution scores use: the drop compares like with like.
    mask = np.logical_and.reduce([a.mask[rows[name]] for name, a in aligned.items()])
    questions = _questions(labels, features)
    runs = {}
    for name, pred in arrays.items():
        table = m.feature_table(pred, target, mask, features, num_resamples=cfg.bootstrap, seed=cfg.seed,
                                groups=questions, metrics=METRICS)
        rows_by_twin = twins.subset_rows(keys, twin_sets[name])
        runs[name] = {"n": len(keys), "mean": table["mean"], "questions": table["groups"],
                      "features": {f: {k: v for k, v in r.items() if k in ("n", "r", "r_ci")}
                                   for f, r in table["features"].items()},
                      "subsets": twins.subset_scores(pred, target, mask, features, rows_by_twin, cfg.bootstrap,
                                                     cfg.seed),
                      "_point": table["feature_point"]["r"], "_samples": table["feature_samples"]["r"]}
    columns = {q: [features.index(f) for f in fs] for q, fs in questions.items()}
    names = list(arrays)
    diffs = m.paired_differences([arrays[n] for n in names], target, mask, num_resamples=cfg.bootstrap, seed=cfg.seed,
                                 metrics=METRICS, groups=columns)
    pairs = []
    for (i, j), d in diffs.items():
        # "new" to both runs, and a twin for either: the galaxies on which the comparison is fair to each.
        rows_by_twin = twins.subset_rows(keys, twin_sets[names[i]] | twin_sets[names[j]])
        pairs.append({"a": names[j], "b": names[i], **_flip(d),
                      "subsets": twins.subset_differences(arrays[names[j]], arrays[names[i]], target, mask,
                                                          rows_by_twin, cfg.bootstrap, cfg.seed)})
    return {"features": features, "dropped": {k: sorted(v) for k, v in dropped.items()}, "runs": runs,
            "pairs": pairs, "questions": list(questions), "n": len(keys)}


def _flip(d: dict) -> dict:
    """i - j as j - i: pairs read 'later run minus earlier run' (e.g. mixed - sdss_only)."""
    def neg(e):
        return {"diff": -e["diff"], "ci": [-e["ci"][1], -e["ci"][0]], "p_gt0": 1 - e["p_gt0"]}
    return {**{k: neg(v) for k, v in d.items() if k != "groups"},
            "groups": {g: {k: neg(v) for k, v in e.items()} for g, e in d["groups"].items()}}


def in_distribution(cfg: OODConfig, name: str, files: dict[str, Path], features: list[str]) -> dict:
    """Metrics on each of the run's own training surveys' test splits, and their mean over surveys.

    Never pooled: r over galaxies of several surveys would credit the model with the variance between surveys,
    so a mixed run's in-distribution r would not be comparable with a single-survey run's. Each survey keeps its
    per-feature r (point and resamples, over `features`, NaN where the survey has no label) for the drop.
    """
    per_survey, mean_samples, points, samples = {}, [], [], []
    for offset, (survey, path) in enumerate(files.items()):
        aligned = align(read_predictions(path).frame, features, read_labels(Path(cfg.shards), survey), str(path))
        table = m.feature_table(aligned.pred, aligned.target, aligned.mask, aligned.names,
                                num_resamples=cfg.bootstrap, seed=cfg.seed + 1 + offset, metrics=METRICS)
        per_survey[survey] = {"n": len(aligned.keys), "mean": table["mean"], "preds": str(path)}
        mean_samples.append(table["samples"])
        columns = [features.index(n) for n in aligned.names]
        points.append(np.full(len(features), np.nan))
        points[-1][columns] = table["feature_point"]["r"]
        samples.append(np.full((cfg.bootstrap, len(features)), np.nan))
        samples[-1][:, columns] = table["feature_samples"]["r"]
    defined = [s for s, res in per_survey.items() if np.isfinite(res["mean"]["r"])]
    mean: dict = {"surveys": defined, "num_surveys": len(defined)}  # a survey without a defined r is left out
    for k in METRICS:
        mean[k] = float(m.mean_over_defined([[per_survey[s]["mean"][k] for s in defined]])[0])
        # The surveys' resamples are independent: the mean of one resample of each is a resample of the mean.
        rows = m.mean_over_defined(np.stack([mean_samples[list(per_survey).index(s)][k] for s in defined], axis=1)) \
            if defined else np.zeros(0)
        mean[f"{k}_ci"] = m.interval(rows)
    return {"surveys": per_survey, "mean": mean, "_point": points, "_samples": samples}


def drop_in_r(ind: dict, held: dict) -> dict:
    """In-distribution minus held-out r: per training survey on the features both it and the held-out survey
    define, then the mean over surveys; the interval from independent resamples (different galaxies)."""
    point = m.mean_over_defined([[m.shared_mean_difference(p, held["_point"])[0] for p in ind["_point"]]])[0]
    if not len(held["_samples"]):
        return {"r": float(point), "r_ci": [float("nan")] * 2}
    rows = m.mean_over_defined(np.stack([m.shared_mean_difference(s, held["_samples"]) for s in ind["_samples"]],
                                        axis=1))
    return {"r": float(point), "r_ci": m.interval(rows)}


def run_study(cfg: OODConfig, quiet: bool = False, log=print) -> dict:
    held = {}
    sources_by_run = {name: sources.open_source(run) for name, run in cfg.runs.items()}
    for name, source in sources_by_run.items():
        if cfg.held_out in source.training_surveys:
            raise ValueError(f"run {name} ({source.path}) trained on {cfg.held_out}: it is not held out for this run")
        log(f"[{name}] {sources.describe(source)}\n  predicting {cfg.held_out} ({cfg.held_out_split}) and its "
            f"training surveys {source.training_surveys} ({cfg.id_split})")
        held[name] = predictions(cfg, name, cfg.runs[name], cfg.held_out, cfg.held_out_split, quiet)
    result = {"held_out": cfg.held_out, "shards": cfg.shards, "held_out_split": cfg.held_out_split,
              "id_split": cfg.id_split, "bootstrap": cfg.bootstrap, "seed": cfg.seed,
              "twin_radius_arcsec": cfg.twin_radius_arcsec,
              **held_out_scores(cfg, held, {n: s.training_surveys for n, s in sources_by_run.items()})}
    for name, source in sources_by_run.items():
        run = result["runs"][name]
        files = {s: predictions(cfg, name, cfg.runs[name], s, cfg.id_split, quiet) for s in source.training_surveys}
        ind = in_distribution(cfg, name, files, result["features"])
        run.update(export=str(source.path), model=source.record(), training_surveys=source.training_surveys,
                   preds={cfg.held_out: str(held[name]), **{s: str(p) for s, p in files.items()}},
                   in_distribution={k: v for k, v in ind.items() if not k.startswith("_")},
                   drop=drop_in_r(ind, run))
        run.pop("_samples")
        run.pop("_point")
    result["gain_plot"] = write_gain_plot(result, Path(cfg.out))
    return result


def write_gain_plot(result: dict, out: Path) -> str | None:
    if not result["pairs"]:
        return None
    from eval import plots

    gains = {f"{p['a']} - {p['b']}": ([p["groups"][q]["r"]["diff"] for q in result["questions"]],
                                      [p["groups"][q]["r"]["ci"] for q in result["questions"]])
             for p in result["pairs"]}
    path = out / "gain.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plots.gain_plot(result["questions"], gains, f"per-question gain in r on held-out "
                                                                 f"{result['held_out']}"))
    return str(path)


def format_study(result: dict) -> str:
    lines = [f"held-out survey {result['held_out']}: {result['n']} galaxies ({result['held_out_split']}), "
             f"{len(result['features'])} features",
             f"{'run':<16}{'trained on':<22}{'ID r (test)':<24}{'held-out r':<24}{'R^2':<8}{'MAE':<8}{'drop':<24}"]
    for name, run in result["runs"].items():
        mean, ind = run["mean"], run["in_distribution"]["mean"]
        lines.append(f"{name:<16}{'+'.join(run['training_surveys']):<22}{cell(ind['r'], ind['r_ci']):<24}"
                     f"{cell(mean['r'], mean['r_ci']):<24}{cell(mean['r2']):<8}{cell(mean['mae']):<8}"
                     f"{cell(run['drop']['r'], run['drop']['r_ci']):<24}")
    lines.append("ID r: the mean over a run's training surveys of each survey's own r (never pooled); drop: ID minus "
                 "held-out r on the features both define")
    lines.append(f"held-out r on new galaxies (no twin within {result.get('twin_radius_arcsec', 1.0):g} arcsec in the "
                 f"run's training surveys' train splits) and on those with one:")
    for name, run in result["runs"].items():
        lines.append(f"  {name:<14}" + "   ".join(f"{k} {_subset_cell(run['subsets'][k])}" for k in twins.SUBSETS))
    for pair in result["pairs"]:
        lines.append(f"{pair['a']} - {pair['b']} on {result['held_out']}: r {cell(pair['r']['diff'], pair['r']['ci'])}"
                     f" (P(>0) {pair['r']['p_gt0']:.2f}), MAE {cell(pair['mae']['diff'], pair['mae']['ci'])}")
        for k in twins.SUBSETS:
            sub = pair["subsets"][k]
            value = cell(sub["diff"], sub["ci"]) if sub["diff"] is not None else "-"
            lines.append(f"    on {k} galaxies (n={sub['n']}): r {value}")
        for q in result["questions"]:
            g = pair["groups"][q]["r"]
            lines.append(f"    {q:<28} {cell(g['diff'], g['ci'])}")
    return "\n".join(lines)


def _subset_cell(sub: dict) -> str:
    value = cell(sub["r"], sub["r_ci"]) if sub["r"] is not None else "-"
    return f"(n={sub['n']}) {value}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = study_config(args)
        result = run_study(cfg, quiet=args.no_progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.out) / "ood.json"
    write_json(result, str(out))
    print(format_study(result))
    print(f"\nwrote {out} and {result['gain_plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
