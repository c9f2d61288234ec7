"""`python -m eval agree`: does the model give a galaxy the same answers in two surveys, as often as volunteers do?

For every survey pair of a `python -m eval match` pairs table and every feature: Pearson r between the model's
predictions for the two copies of each galaxy, next to r between the two surveys' volunteer fractions for the same
galaxies. Both are computed on the same pairs (those where both surveys have the answer from enough votes, as
`eval metrics` counts labels) with the same bootstrap resamples of pairs, so their difference is paired. The
volunteers' r is the yardstick: two surveys' volunteers disagree too (finite votes; each survey shows them a
different image of the galaxy), so it says how much agreement the surveys' images and votes support.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from eval import metrics as m
from eval.labels import SurveyLabels, label_mask, read_labels, read_predictions
from eval.match import PAIR_COLUMNS
from eval.score import cell, write_json
from eval.store import read_metadata

KIND = "agree"

EXAMPLES = """examples:
  python -m eval match --shards data/shards --surveys sdss,decals --out pairs.parquet
  python -m eval predict --model runs/mixed --shards data/shards --surveys sdss,decals --split all --out preds.parquet
  python -m eval agree --pairs pairs.parquet --predictions preds.parquet --out agree.json --plot agree.png
  python -m eval agree --pairs pairs.parquet --predictions sdss.parquet decals.parquet --shards data/shards
  python -m eval report agree.json --out report.html
Prediction files are joined to the pairs by key (a key names its survey), so one file or one per survey both work."""


def read_pairs(path: str | Path) -> tuple[pd.DataFrame, dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs file {path} does not exist; make one with `python -m eval match`")
    frame = pd.read_parquet(path)
    missing = [c for c in ("survey_a", "key_a", "survey_b", "key_b") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}: not a pairs file of `python -m eval match` "
                         f"(columns {list(PAIR_COLUMNS)})")
    return frame.astype({c: str for c in ("survey_a", "key_a", "survey_b", "key_b")}), read_metadata(path)


def read_all_predictions(paths: list[str | Path]) -> tuple[pd.DataFrame, list[str], list[dict]]:
    """(every prediction row indexed by key, the predicted feature names in order, each file's model record)."""
    frames, names, models = [], {}, []
    for path in paths:
        preds = read_predictions(path)
        frames.append(preds.frame.assign(key=preds.frame["key"].astype(str)))
        names.update(dict.fromkeys(preds.names))
        models.append(preds.metadata.get("model", {}))
    frame = pd.concat(frames, ignore_index=True)
    dupes = frame["key"][frame["key"].duplicated()]
    if len(dupes):
        raise ValueError(f"{len(dupes)} key(s) are predicted more than once across {[str(p) for p in paths]} "
                         f"(e.g. {dupes.iloc[:3].tolist()}); give each galaxy's predictions once")
    return frame.set_index("key"), list(names), models


def _columns(frame: pd.DataFrame, keys: pd.Series | None, names: list[str]) -> np.ndarray:
    """(n, F) float64 values of `names` for `keys` (None: every row), NaN where the key or the column is absent."""
    rows = frame if keys is None else frame.reindex(keys.to_numpy())
    return np.column_stack([rows[n].to_numpy(np.float64) if n in rows.columns else np.full(len(rows), np.nan)
                            for n in names]) if names else np.zeros((len(keys), 0))


def skipped_features(names: list[str], labels_a: SurveyLabels, labels_b: SurveyLabels, pred_a: np.ndarray,
                     pred_b: np.ndarray) -> dict[str, str]:
    """feature -> why it is not compared: a survey lacks the answer, or the model did not predict it there."""
    out = {}
    for j, name in enumerate(names):
        lacking = [s.survey for s in (labels_a, labels_b) if not s.has(name)]
        unpredicted = [s for s, p in ((labels_a.survey, pred_a), (labels_b.survey, pred_b))
                       if not np.isfinite(p[:, j]).any()]
        if lacking:
            out[name] = f"no label column in {' and '.join(lacking)}"
        elif unpredicted:
            out[name] = f"not predicted for {' and '.join(unpredicted)}"
    return out


def _float(value) -> float:
    return float(value) if np.isfinite(value) else float("nan")


def _row(table: dict, name: str) -> dict:
    row = table["features"][name]
    return {"n": row["n"], "r": row["r"], "r_ci": row["r_ci"]}


def agreement_tables(model_a, model_b, frac_a, frac_b, mask, names: list[str], bootstrap: int, seed: int) -> dict:
    """Per feature and mean over features: model r, volunteer r (same pairs, same resamples), their difference,
    and the model's r on every predicted pair (labels or not)."""
    kw = dict(num_resamples=bootstrap, seed=seed, metrics=("r",))
    model = m.feature_table(model_a, model_b, mask, names, **kw)
    volunteers = m.feature_table(frac_a, frac_b, mask, names, **kw)
    every = m.feature_table(model_a, model_b, np.isfinite(model_a) & np.isfinite(model_b), names, **kw)
    diff_point = model["feature_point"]["r"] - volunteers["feature_point"]["r"]
    diff_samples = model["feature_samples"]["r"] - volunteers["feature_samples"]["r"]
    features = {}
    for j, name in enumerate(names):
        features[name] = {"model": _row(model, name), "volunteers": _row(volunteers, name),
                          "difference": {"diff": _float(diff_point[j]),
                                         "ci": m.interval(diff_samples[:, j]) if bootstrap else [float("nan")] * 2},
                          "model_all_pairs": _row(every, name)}
    mean_diff = m.shared_mean_difference(model["feature_point"]["r"], volunteers["feature_point"]["r"])[0]
    mean_samples = m.shared_mean_difference(model["feature_samples"]["r"], volunteers["feature_samples"]["r"])
    mean = {"model": {k: model["mean"][k] for k in ("r", "r_ci", "num_features")},
            "volunteers": {k: volunteers["mean"][k] for k in ("r", "r_ci", "num_features")},
            "difference": {"diff": _float(mean_diff),
                           "ci": m.interval(mean_samples) if bootstrap else [float("nan")] * 2},
            "model_all_pairs": {k: every["mean"][k] for k in ("r", "r_ci", "num_features")}}
    return {"features": features, "mean": mean}


def survey_pair_agreement(pairs: pd.DataFrame, preds: pd.DataFrame, names: list[str], labels_a: SurveyLabels,
                          labels_b: SurveyLabels, bootstrap: int, seed: int) -> dict:
    """Agreement of one survey pair over its pairs that have predictions on both sides."""
    predicted = pairs["key_a"].isin(preds.index) & pairs["key_b"].isin(preds.index)
    pairs = pairs[predicted.to_numpy()]
    pred_a, pred_b = _columns(preds, pairs["key_a"], names), _columns(preds, pairs["key_b"], names)
    skipped = skipped_features(names, labels_a, labels_b, pred_a, pred_b)
    kept = [j for j, n in enumerate(names) if n not in skipped]
    kept_names = [names[j] for j in kept]
    rows_a = labels_a.frame.reindex(pairs["key_a"].to_numpy())
    rows_b = labels_b.frame.reindex(pairs["key_b"].to_numpy())
    frac_a, frac_b = _columns(rows_a, None, kept_names), _columns(rows_b, None, kept_names)
    model_a, model_b = pred_a[:, kept], pred_b[:, kept]
    # Both surveys must have the answer, each from enough votes (the rule every eval job scores labels by).
    mask = (label_mask(rows_a, kept_names, labels_a.questions) & label_mask(rows_b, kept_names, labels_b.questions)
            & np.isfinite(model_a) & np.isfinite(model_b))
    result = {"survey_a": labels_a.survey, "survey_b": labels_b.survey, "n_pairs": int(len(predicted)),
              "n_predicted": int(predicted.sum()), "skipped": skipped}
    result.update(agreement_tables(model_a, model_b, frac_a, frac_b, mask, kept_names, bootstrap, seed))
    return result


def _model_note(models: list[dict]) -> str | None:
    hashes = {str(model.get("weights_sha256")) for model in models if model.get("weights_sha256")}
    if len(hashes) > 1:
        return (f"the prediction files come from {len(hashes)} different models (weights {sorted(hashes)}): the "
                "agreement then compares models, not one model's consistency across surveys")
    return None


def agree(pairs_path: str | Path, prediction_paths: list[str | Path], shards: str | Path | None = None,
          bootstrap: int = 1000, seed: int = 0, log=print) -> dict:
    pairs, pairs_meta = read_pairs(pairs_path)
    root = shards or pairs_meta.get("shards")
    if not root:
        raise ValueError(f"{pairs_path} does not say which shards it was matched on; pass --shards")
    preds, names, models = read_all_predictions(prediction_paths)
    result = {"kind": KIND, "pairs_file": str(pairs_path), "predictions": [str(p) for p in prediction_paths],
              "shards": str(root), "bootstrap": bootstrap, "seed": seed,
              "radius_arcsec": pairs_meta.get("radius_arcsec"), "models": models,
              "survey_pairs": {}, "skipped_survey_pairs": {}}
    note = _model_note(models)
    if note:
        log(f"warning: {note}")
        result["note"] = note
    predicted_surveys = set(preds["survey"].astype(str)) if "survey" in preds.columns else set()
    for (a, b), group in pairs.groupby(["survey_a", "survey_b"], sort=False):
        label = f"{a}-{b}"
        absent = [s for s in (a, b) if s not in predicted_surveys]
        if absent:
            result["skipped_survey_pairs"][label] = f"no predictions for {' and '.join(absent)}"
            continue
        entry = survey_pair_agreement(group, preds, names, read_labels(Path(root), a), read_labels(Path(root), b),
                                      bootstrap, seed)
        if entry["n_predicted"] == 0:
            result["skipped_survey_pairs"][label] = "no pair has predictions on both sides"
            continue
        if entry["skipped"]:
            log(f"note: {label}: not compared: " + "; ".join(f"{f} ({why})" for f, why in entry["skipped"].items()))
        result["survey_pairs"][label] = entry
    if not result["survey_pairs"]:
        raise ValueError(f"no survey pair of {pairs_path} has predictions on both sides "
                         f"({result['skipped_survey_pairs'] or 'the pairs file is empty'}); predict every survey "
                         "it matches")
    return result


def format_table(result: dict) -> str:
    lines = []
    for label, res in result["survey_pairs"].items():
        mean = res["mean"]
        lines += [f"\n{label}: {res['n_predicted']} of {res['n_pairs']} pairs predicted on both sides; mean over "
                  f"{mean['model']['num_features']} features: model r {cell(mean['model']['r'], mean['model']['r_ci'])}"
                  f", volunteers r {cell(mean['volunteers']['r'], mean['volunteers']['r_ci'])}, difference "
                  f"{cell(mean['difference']['diff'], mean['difference']['ci'])}",
                  f"{'feature':<36}{'n':>6}  {'model r [95% CI]':<26}{'volunteers r [95% CI]':<26}"
                  f"{'model - volunteers':<26}{'n all':>7}{'r all':>7}"]
        for name, row in res["features"].items():
            d, every = row["difference"], row["model_all_pairs"]
            lines.append(f"{name:<36}{row['model']['n']:>6}  {cell(row['model']['r'], row['model']['r_ci']):<26}"
                         f"{cell(row['volunteers']['r'], row['volunteers']['r_ci']):<26}{cell(d['diff'], d['ci']):<26}"
                         f"{every['n']:>7}{cell(every['r']):>7}")
        lines += [f"skipped {name}: {why}" for name, why in res["skipped"].items()]
    lines += [f"\nskipped survey pair {label}: {why}" for label, why in result["skipped_survey_pairs"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval agree", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cross-survey agreement: for every survey pair of a pairs file (python -m eval match) and every "
                    "feature, Pearson r between the model's predictions for the same galaxy in the two surveys, "
                    "next to r between the two surveys' volunteer fractions, on the same pairs (both surveys have "
                    "the answer from at least 2 votes) with paired bootstrap 95%% intervals (resampling pairs) and "
                    "the mean over features. 'n all' / 'r all': the model on every pair predicted on both sides.")
    parser.add_argument("--pairs", required=True, help="pairs Parquet of `python -m eval match`")
    parser.add_argument("--predictions", nargs="+", required=True,
                        help="Parquet files of `python -m eval predict` covering both surveys of a pair")
    parser.add_argument("--shards", help="shard root holding the labels (default: the one the pairs were matched on)")
    parser.add_argument("--out", help="write the JSON here (for `python -m eval report`)")
    parser.add_argument("--plot", help="write the per-feature model-vs-volunteers agreement plot (PNG) here")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of pairs (0: no intervals)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
        result = agree(args.pairs, args.predictions, args.shards, args.bootstrap, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out:
        write_json(result, args.out)
        print(f"\nwrote {args.out}")
    if args.plot:
        from eval import plots

        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        Path(args.plot).write_bytes(plots.agreement_bars(result["survey_pairs"]))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
