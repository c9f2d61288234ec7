"""`python -m eval metrics`: predictions joined to labels by key, scored per survey and per feature by name."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from eval import metrics as m, nll
from eval.labels import Aligned, align, read_labels, read_predictions, total_votes, votes

EXAMPLES = """examples:
  python -m eval metrics ukidss.parquet                    # labels from the shards the predictions came from
  python -m eval metrics preds.parquet --shards data/shards --bootstrap 2000 --json metrics.json
  python -m eval metrics preds.parquet --json -            # JSON only, on stdout"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval metrics", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a prediction file against labels.parquet, per survey and per feature NAME: n, Pearson r, "
                    "Spearman rho, R^2, MAE, MSE with bootstrap 95%% intervals (resampling galaxies), each feature's "
                    "noise ceiling (the best r reachable given the finite volunteer votes, on the same galaxies), the "
                    "Dirichlet-multinomial NLL per question (models trained with the Dirichlet loss only), and "
                    "accuracy on confident galaxies (volunteer fraction > 0.8 on one answer). A label counts where "
                    "its question got at least 2 votes.")
    parser.add_argument("predictions", help="a Parquet file written by `python -m eval predict`")
    parser.add_argument("--shards", help="shard root holding the labels (default: the one the predictions name)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", help="write the metrics JSON here ('-': print JSON only)")
    return parser.parse_args(argv)


def question_scores(aligned: Aligned, frame, questions: dict[str, list[str]], other_questions: list[str],
                    nll_absent: str | None) -> dict:
    """Per question: confident-galaxy accuracy and, unless `nll_absent` says why not, the Dirichlet-multinomial NLL
    (the training loss on the predicted raw logits; mean over galaxies with votes)."""
    out = {}
    frame = frame.set_index("key").loc[aligned.keys]
    for question, features in questions.items():
        if not all(f in frame.columns for f in features):
            continue
        pred = frame[features].to_numpy(np.float64)
        target = np.column_stack([aligned.labels[f].to_numpy(np.float64) if f in aligned.labels.columns
                                  else np.full(len(frame), np.nan) for f in features])
        accuracy, n_confident = m.confident_accuracy(pred, target)
        row: dict = {"accuracy": accuracy, "n_confident": n_confident}
        other = nll.other_logit_column(question) if question in other_questions else None
        columns = [nll.logit_column(f) for f in features] + ([other] if other else [])
        totals = total_votes(aligned, question)
        if nll_absent is None and all(c in frame.columns for c in columns) and np.isfinite(totals).any():
            per_galaxy = nll.question_nll(frame[columns[:len(features)]].to_numpy(np.float32),
                                          frame[other].to_numpy(np.float32) if other else None,
                                          votes(aligned, features), totals)
            has = np.isfinite(per_galaxy)
            row.update(nll=float(per_galaxy[has].mean()) if has.any() else math.nan, n_votes=int(has.sum()))
            row["_per_galaxy"] = per_galaxy
        out[question] = row
    return out


def score_survey(aligned: Aligned, frame, questions: dict[str, list[str]], other_questions: list[str],
                 bootstrap: int, seed: int, nll_absent: str | None = None) -> dict:
    table = m.feature_table(aligned.pred, aligned.target, aligned.mask, aligned.names, num_resamples=bootstrap,
                            seed=seed)
    for j, (name, row) in enumerate(table["features"].items()):
        question = next((q for q, fs in questions.items() if name in fs), None)
        totals = total_votes(aligned, question) if question else np.full(len(aligned.keys), np.nan)
        scored = aligned.mask[:, j]  # the galaxies r was computed on
        row["ceiling_r"] = m.noise_ceiling_r(aligned.target[scored, j], totals[scored])
    ceilings = [r["ceiling_r"] for r in table["features"].values() if np.isfinite(r["ceiling_r"])
                and np.isfinite(r["r"])]
    table["mean"]["ceiling_r"] = float(np.mean(ceilings)) if ceilings else math.nan
    q_scores = question_scores(aligned, frame, questions, other_questions, nll_absent)
    per_galaxy = [q.pop("_per_galaxy") for q in q_scores.values() if "_per_galaxy" in q]
    result = {"n": len(aligned.keys), "num_unmatched": aligned.num_unmatched, "mean": table["mean"],
              "features": table["features"], "questions": q_scores, "dropped": aligned.dropped}
    if nll_absent is not None:
        result["nll_absent"] = nll_absent
    elif per_galaxy:
        # Training's per-galaxy loss: the sum over a galaxy's labelled questions, averaged over labelled galaxies.
        stacked = np.column_stack(per_galaxy)
        labelled = np.isfinite(stacked).any(axis=1)
        result["nll"] = float(np.nansum(stacked[labelled], axis=1).mean()) if labelled.any() else math.nan
    else:
        result["nll_absent"] = "no Dirichlet NLL: no question of this survey has vote counts"
    return result


def score(path: str | Path, shards: str | Path | None = None, bootstrap: int = 1000, seed: int = 0,
          log=print) -> dict:
    preds = read_predictions(path)
    root = preds.shards(shards)
    result = {"predictions": str(path), "shards": str(root), "bootstrap": bootstrap, "seed": seed,
              "model": preds.metadata.get("model", {}), "surveys": {}}
    nll_absent = nll.absent_reason(result["model"], preds.frame.columns)
    if nll_absent:
        result["nll_absent"] = nll_absent
    for survey in preds.surveys:
        frame = preds.frame[preds.frame["survey"] == survey]
        labels = read_labels(root, survey)
        aligned = align(frame, preds.names, labels, str(path))
        if aligned.num_unmatched:
            log(f"warning: {aligned.num_unmatched} of {len(frame)} {survey} prediction keys are not in "
                f"{root / survey / 'labels.parquet'}; scored the {len(aligned.keys)} that are")
        if aligned.dropped:
            log(f"note: {survey}: not scored (no label column): {sorted(aligned.dropped)}")
        result["surveys"][survey] = score_survey(aligned, frame, labels.questions,
                                                 preds.metadata.get("model", {}).get("other_questions", []),
                                                 bootstrap, seed, nll_absent)
    return result


def cell(value: float, ci: list[float] | None = None) -> str:
    if not np.isfinite(value):
        return "-"
    if ci and all(np.isfinite(ci)):
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


def format_table(result: dict) -> str:
    lines = []
    for survey, res in result["surveys"].items():
        mean = res["mean"]
        lines += [f"\n{survey}: {res['n']} galaxies, mean over {mean['num_features']} features: r "
                  f"{cell(mean['r'], mean['r_ci'])}, R^2 {cell(mean['r2'], mean['r2_ci'])}, MAE "
                  f"{cell(mean['mae'], mean['mae_ci'])}, ceiling r {cell(mean['ceiling_r'])}, "
                  + (f"Dirichlet NLL {cell(res['nll'])}" if "nll" in res else res["nll_absent"]),
                  f"{'feature':<34}{'n':>6}  {'r [95% CI]':<24}{'rho':>7}{'R^2':>8}{'MAE':>7}{'ceiling':>9}"]
        for name, row in res["features"].items():
            if row["n"] == 0:
                continue
            lines.append(f"{name:<34}{row['n']:>6}  {cell(row['r'], row['r_ci']):<24}{cell(row['spearman']):>7}"
                         f"{cell(row['r2']):>8}{cell(row['mae']):>7}{cell(row['ceiling_r']):>9}")
        if res["questions"]:
            lines.append(f"{'question':<34}{'NLL' if 'nll' in res else '':>8}{'confident acc':>15}{'n conf':>8}")
            for q, row in res["questions"].items():
                lines.append(f"{q:<34}{cell(row['nll']) if 'nll' in row else '':>8}{cell(row['accuracy']):>15}"
                             f"{row['n_confident']:>8}")
    return "\n".join(lines)


def write_json(result: dict, target: str | None) -> None:
    if target and target != "-":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")


def emit(result: dict, target: str | None, table: str) -> None:
    """`--json -`: the JSON alone on stdout; otherwise the table, and the JSON file when one is named."""
    if target == "-":
        print(json.dumps(result, indent=2))
        return
    print(table)
    if target:
        write_json(result, target)
        print(f"\nwrote {target}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet = args.json == "-"
    try:
        result = score(args.predictions, args.shards, args.bootstrap, args.seed,
                       log=(lambda text: print(text, file=sys.stderr)) if quiet else print)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    emit(result, args.json, format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
