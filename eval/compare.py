"""`python -m eval compare`: models compared on the features they all predict, matched by NAME, never by position."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from eval import metrics as m
from eval.labels import Predictions, label_mask, read_labels, read_predictions
from eval.score import cell, emit

EXAMPLES = """examples:
  python -m eval compare sdss_only.parquet mixed.parquet --json compare.json
  python -m eval compare runs/sdss_only runs/mixed --shards data/shards --survey ukidss   # exports: predicted first
Inputs with different feature sets (74, 52, 26, 14 columns) are compared on the names they share."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval compare", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare two or more models on the same galaxies and on the intersection of feature NAMES that "
                    "every input predicts and the labels hold; lists what was dropped from each input and why. A "
                    "paired bootstrap over galaxies gives each pairwise difference in mean r and MAE with its 95%% "
                    "interval.")
    parser.add_argument("inputs", nargs="+", help="prediction files, run folders or exports (at least two)")
    parser.add_argument("--shards", help="shard root with the labels (needed to predict exports)")
    parser.add_argument("--survey", help="compare on this survey only (default: every survey the inputs share)")
    parser.add_argument("--split", default="test", help="split predicted for exports (test, val, train, all)")
    parser.add_argument("--work", default="eval_compare", help="folder for the predictions of exports")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the comparison JSON here ('-': JSON only)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser.parse_args(argv)


def load_input(path: str, args: argparse.Namespace, label: str) -> Predictions:
    """A prediction file as is; a run folder or export is predicted on --survey first (into --work/<label>/, in a
    file named by its weights hash and the split, so a retrained model or another split is never served stale)."""
    if Path(path).is_file():
        return read_predictions(path)
    from eval import predict

    if not (args.shards and args.survey):
        raise ValueError(f"{path} is a model, not a prediction file: pass --shards and --survey to predict it first")
    return read_predictions(predict.cached_prediction(path, args.shards, args.survey, args.split,
                                                      Path(args.work) / label, device=args.device))


def labels_for(inputs: list[str]) -> list[str]:
    names = []
    for path in inputs:
        stem = Path(path).stem if Path(path).suffix == ".parquet" else Path(path).resolve().name
        stem = Path(path).resolve().parent.name if stem == "export" else stem
        names.append(stem if stem not in names else f"{stem}_{len(names)}")
    return names


def common_features(preds: dict[str, Predictions], label_columns: set[str],
                    labelled: set[str]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Names every input predicts and the labels hold (in the first input's order), and per input what was dropped."""
    first = next(iter(preds.values())).names
    shared = [n for n in first if all(n in p.names for p in preds.values())]
    features = [n for n in shared if n in label_columns and n in labelled]
    dropped: dict[str, dict[str, str]] = {}
    for label, p in preds.items():
        reasons = {}
        for name in p.names:
            if name in features:
                continue
            missing = [other for other, q in preds.items() if name not in q.names]
            reasons[name] = (f"not predicted by {', '.join(missing)}" if missing else
                             "not a label column" if name not in label_columns else "no labelled galaxy")
        dropped[label] = reasons
    if not features:
        detail = "; ".join(f"{label} predicts {len(p.names)} ({p.names[:4]}...)" for label, p in preds.items())
        raise ValueError(f"the inputs have no feature in common that the labels hold: {detail}. Compare models that "
                         "predict at least one shared feature by name")
    return features, dropped


def gather(preds: dict[str, Predictions], surveys: list[str], shards: Path) -> tuple[pd.DataFrame, dict, dict]:
    """Label rows of the galaxies every input predicted (keys in all inputs and in labels.parquet), the counts, and
    the question -> features map of the shards."""
    keys = None
    for p in preds.values():
        ks = set(p.frame.loc[p.frame["survey"].isin(surveys), "key"].astype(str))
        keys = ks if keys is None else keys & ks
    frames, questions = [], {}
    for survey in surveys:
        labels = read_labels(shards, survey)
        frames.append(labels.frame[labels.frame.index.isin(keys)])
        questions.update(labels.questions)
    rows = pd.concat(frames) if frames else pd.DataFrame()
    counts = {label: int(p.frame["survey"].isin(surveys).sum()) for label, p in preds.items()}
    return rows.sort_index(), {"common": len(rows), "per_input": counts}, questions


def compare(inputs: list[str], args: argparse.Namespace) -> dict:
    if len(inputs) < 2:
        raise ValueError("compare needs at least two inputs")
    labels = labels_for(inputs)
    preds = {label: load_input(path, args, label) for label, path in zip(labels, inputs)}
    shared_surveys = set.intersection(*(set(p.surveys) for p in preds.values()))
    surveys = [args.survey] if args.survey else sorted(shared_surveys)
    if not surveys or (args.survey and args.survey not in shared_surveys):
        raise ValueError(f"no survey is predicted by every input (they cover "
                         f"{ {k: p.surveys for k, p in preds.items()} })")
    shards = Path(args.shards) if args.shards else next(iter(preds.values())).shards(None)
    rows, counts, questions = gather(preds, surveys, shards)
    if not len(rows):
        raise ValueError(f"no galaxy of {surveys} is predicted by every input and present in the labels")
    label_columns = set(rows.columns)
    labelled = {c for c in label_columns if pd.api.types.is_float_dtype(rows[c]) and rows[c].notna().any()}
    features, dropped = common_features(preds, label_columns, labelled)
    target = rows[features].to_numpy(np.float64)
    mask = label_mask(rows, features, questions)
    arrays = [p.frame.set_index(p.frame["key"].astype(str)).loc[rows.index, features].to_numpy(np.float64)
              for p in preds.values()]
    models = {}
    for label, pred, path in zip(labels, arrays, inputs):
        table = m.feature_table(pred, target, mask, features, num_resamples=args.bootstrap, seed=args.seed)
        models[label] = {"input": path, "model": preds[label].metadata.get("model", {}), "mean": table["mean"],
                         "features": {n: {k: v for k, v in row.items() if k in ("n", "r", "r_ci", "mae", "mae_ci")}
                                      for n, row in table["features"].items()}}
    diffs = m.paired_differences(arrays, target, mask, num_resamples=args.bootstrap, seed=args.seed)
    pairs = [{"a": labels[i], "b": labels[j], **d} for (i, j), d in diffs.items()]
    return {"surveys": surveys, "shards": str(shards), "n": len(rows), "galaxies": counts, "features": features,
            "dropped": {label: sorted(reasons) for label, reasons in dropped.items()},
            "dropped_reasons": dropped, "models": models, "pairs": pairs, "bootstrap": args.bootstrap}


def format_comparison(result: dict) -> str:
    lines = [f"compared on {result['n']} galaxies of {', '.join(result['surveys'])} and {len(result['features'])} "
             f"features shared by name"]
    for label, names in result["dropped"].items():
        if names:
            reasons = sorted(set(result["dropped_reasons"][label].values()))
            lines.append(f"  dropped from {label}: {len(names)} ({'; '.join(reasons)})")
    lines.append(f"{'model':<24}{'mean r [95% CI]':<26}{'mean MAE [95% CI]':<26}")
    for label, res in result["models"].items():
        lines.append(f"{label:<24}{cell(res['mean']['r'], res['mean']['r_ci']):<26}"
                     f"{cell(res['mean']['mae'], res['mean']['mae_ci']):<26}")
    for pair in result["pairs"]:
        lines.append(f"{pair['a']} - {pair['b']}: r {cell(pair['r']['diff'], pair['r']['ci'])}, "
                     f"MAE {cell(pair['mae']['diff'], pair['mae']['ci'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = compare(args.inputs, args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    emit(result, args.json, format_comparison(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
