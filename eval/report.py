"""`python -m eval report`: one self-contained HTML file (plots as PNG data URIs) from evaluation JSON outputs."""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from pathlib import Path

import numpy as np

from eval import plots
from eval.labels import align, read_labels, read_predictions

EXAMPLES = """examples:
  python -m eval report ukidss_metrics.json --out report.html
  python -m eval report metrics.json reports/ood/ood.json reports/robust/robustness.json compare.json --out report.html
  python -m eval report metrics.json agree.json --out report.html
Inputs are the JSON files of `eval metrics`, `eval compare`, `eval ood`, `eval robustness` and `eval agree`, in any
order."""
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}.note{color:#666;font-size:.85em}
details{margin:.5em 0}"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval report", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build one self-contained HTML report (no network, no server: every plot is an embedded PNG) "
                    "from evaluation JSON outputs: summary tables, per-feature r against the noise ceiling, "
                    "predicted vs true per question, the worst-predicted galaxies, model comparisons, the "
                    "held-out-survey gain plot, robustness curves, calibration and cross-survey agreement.")
    parser.add_argument("inputs", nargs="+", help="JSON files from eval metrics / compare / ood / robustness / agree")
    parser.add_argument("--out", default="report.html", help="the HTML file to write")
    parser.add_argument("--worst", type=int, default=12, help="worst-predicted galaxies shown per survey")
    return parser.parse_args(argv)


def kind_of(data: dict) -> str:
    if data.get("kind") == "agree":
        return "agree"
    if "kinds" in data:
        return "robustness"
    if "held_out" in data and "runs" in data:
        return "ood"
    if "pairs" in data and "models" in data:
        return "compare"
    if "surveys" in data and "predictions" in data:
        return "metrics"
    raise ValueError("not an output of eval metrics, compare, ood, robustness or agree")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _num(value, ci=None) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "&ndash;"
    if ci and all(isinstance(c, (int, float)) and math.isfinite(c) for c in ci):
        return f"{value:.3f} <span class=note>[{ci[0]:.3f}, {ci[1]:.3f}]</span>"
    return f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _model_line(model: dict) -> str:
    if not model:
        return ""
    mix = ", ".join(f"{k} {v:.2f}" for k, v in model.get("mix", {}).items()) or "unknown"
    return (f"<p class=note>model {html.escape(str(model.get('export')))}: {html.escape(str(model.get('model')))} "
            f"{html.escape(str(model.get('stage')))} stage, step {model.get('step')}, trained on {html.escape(mix)}, "
            f"commit {html.escape(str(model.get('git_commit') or 'unknown')[:12])}</p>")


def metrics_section(data: dict, worst: int) -> str:
    parts = [f"<h2>Metrics: {html.escape(Path(data['predictions']).name)}</h2>", _model_line(data.get("model", {}))]
    with_nll = any("nll" in r for r in data["surveys"].values())
    rows = [[html.escape(s), str(r["n"]), _num(r["mean"]["r"], r["mean"]["r_ci"]), _num(r["mean"]["r2"], r["mean"]["r2_ci"]),
             _num(r["mean"]["mae"], r["mean"]["mae_ci"]), _num(r["mean"].get("ceiling_r"))]
            + ([_num(r.get("nll"))] if with_nll else []) for s, r in data["surveys"].items()]
    parts.append(_table(["survey", "galaxies", "mean r [95% CI]", "R^2", "MAE", "noise ceiling r"]
                        + (["Dirichlet NLL"] if with_nll else []), rows))
    reasons = sorted({r["nll_absent"] for r in data["surveys"].values() if "nll_absent" in r})
    parts += [f"<p class=note>{html.escape(reason)}.</p>" for reason in reasons]
    parts.append(_img(plots.feature_bars(data["surveys"]), "r per feature"))
    for survey, res in data["surveys"].items():
        feature_rows = [[html.escape(n), str(f["n"]), _num(f["r"], f["r_ci"]), _num(f["spearman"]), _num(f["r2"]),
                         _num(f["mae"]), _num(f.get("ceiling_r"))] for n, f in res["features"].items() if f["n"]]
        question_rows = [[html.escape(q)] + ([_num(row.get("nll"))] if with_nll else [])
                         + [_num(row["accuracy"]), str(row["n_confident"])]
                         for q, row in res.get("questions", {}).items()]
        parts.append(f"<details><summary>{html.escape(survey)}: every feature and question</summary>"
                     + _table(["feature", "n", "r [95% CI]", "Spearman", "R^2", "MAE", "ceiling"], feature_rows)
                     + _table(["question"] + (["NLL"] if with_nll else []) + ["confident accuracy",
                                                                               "confident galaxies"], question_rows)
                     + "</details>")
    parts += _prediction_views(data, worst)
    return "\n".join(parts)


def _prediction_views(data: dict, worst: int) -> list[str]:
    """Hexbins and the worst galaxies need the predictions and labels themselves; skipped (with a note) if gone."""
    path, shards = Path(data["predictions"]), Path(data["shards"])
    if not path.is_file():
        return [f"<p class=note>{html.escape(str(path))} is not there any more: predicted-vs-true plots skipped.</p>"]
    preds = read_predictions(path)
    out = []
    for survey in data["surveys"]:
        labels = read_labels(shards, survey)
        aligned = align(preds.frame[preds.frame["survey"] == survey], preds.names, labels, str(path))
        panels = []
        for question, features in labels.questions.items():
            cols = [aligned.names.index(f) for f in features if f in aligned.names]
            if cols and aligned.mask[:, cols].any():
                panels.append((question, aligned.target[:, cols].ravel(), aligned.pred[:, cols].ravel()))
        out.append(f"<h3>{html.escape(survey)}: predicted vs volunteer fraction</h3>")
        out.append(_img(plots.hexbins(panels), f"{survey} predicted vs true"))
        out.append(_worst_sheet(aligned, shards, survey, worst))
    return out


def _worst_sheet(aligned, shards: Path, survey: str, worst: int) -> str:
    from eval.thumbnails import read_thumbnails

    err = np.where(aligned.mask, np.abs(aligned.pred - np.nan_to_num(aligned.target)), np.nan)
    labelled = np.isfinite(err).sum(axis=1) >= 3
    if not labelled.any() or worst <= 0:
        return ""
    per_galaxy = np.where(labelled, np.nanmean(np.where(labelled[:, None], err, 0.0), axis=1), -np.inf)
    order = np.argsort(-per_galaxy)[:worst]
    keys = [aligned.keys[i] for i in order if np.isfinite(per_galaxy[i])]
    unreadable: dict[str, str] = {}
    thumbs = read_thumbnails(shards, keys, unreadable=unreadable)
    shown = [k for k in keys if k in thumbs]
    note = "".join(f"<p class=note>image of {html.escape(k)} unreadable ({html.escape(reason)}); check the shards "
                   "with python -m sharding.verify.</p>" for k, reason in unreadable.items())
    if not shown:
        return note or f"<p class=note>images of the worst {survey} galaxies are not in {html.escape(str(shards))}.</p>"
    titles = [f"{k}\nmean |err| {per_galaxy[aligned.keys.index(k)]:.2f}" for k in shown]
    return (f"<h3>{html.escape(survey)}: the {len(shown)} worst-predicted galaxies</h3>"
            + _img(plots.contact_sheet([thumbs[k] for k in shown], titles), f"{survey} worst galaxies") + note)


def compare_section(data: dict) -> str:
    rows = [[html.escape(label), _num(res["mean"]["r"], res["mean"]["r_ci"]), _num(res["mean"]["mae"], res["mean"]["mae_ci"]),
             str(len(data["dropped"].get(label, [])))] for label, res in data["models"].items()]
    pairs = [[html.escape(f"{p['a']} - {p['b']}"), _num(p["r"]["diff"], p["r"]["ci"]), _num(p["mae"]["diff"], p["mae"]["ci"])]
             for p in data["pairs"]]
    return "\n".join([f"<h2>Model comparison on {html.escape(', '.join(data['surveys']))}</h2>",
                      f"<p>{data['n']} galaxies, {len(data['features'])} features shared by name.</p>",
                      _table(["model", "mean r [95% CI]", "mean MAE", "features dropped"], rows),
                      _table(["pair (paired bootstrap)", "difference in r", "difference in MAE"], pairs)])


def ood_section(data: dict) -> str:
    rows = []
    for name, run in data["runs"].items():
        ind = run["in_distribution"]["mean"]
        subsets = run.get("subsets", {})  # absent in studies made before twin-aware scores
        rows.append([html.escape(name), html.escape("+".join(run["training_surveys"])), _num(ind["r"], ind["r_ci"]),
                     _num(run["mean"]["r"], run["mean"]["r_ci"]),
                     *(_subset(subsets.get(k), "r", "r_ci") for k in ("new", "twin")),
                     _num(run["mean"]["r2"], run["mean"]["r2_ci"]),
                     _num(run["mean"]["mae"], run["mean"]["mae_ci"]), _num(run["drop"]["r"], run["drop"]["r_ci"])])
    pairs = [[html.escape(f"{p['a']} - {p['b']}"), _num(p["r"]["diff"], p["r"]["ci"]), f"{p['r']['p_gt0']:.2f}",
              _subset(p.get("subsets", {}).get("new"), "diff", "ci"), _num(p["mae"]["diff"], p["mae"]["ci"])]
             for p in data["pairs"]]
    question_rows = [[html.escape(q)] + [_num(run["questions"][q]["r"], run["questions"][q]["r_ci"])
                                         for run in data["runs"].values()] for q in data["questions"]]
    gains = {f"{p['a']} - {p['b']}": ([p["groups"][q]["r"]["diff"] for q in data["questions"]],
                                      [p["groups"][q]["r"]["ci"] for q in data["questions"]]) for p in data["pairs"]}
    parts = [f"<h2>Held-out survey: {html.escape(data['held_out'])}</h2>",
             f"<p>{data['n']} galaxies of {html.escape(data['held_out'])} ({html.escape(data['held_out_split'])}), "
             f"which no run trained on; in-distribution r: the mean over each run's training surveys of its r on "
             f"that survey's {html.escape(data['id_split'])} split (never pooled across surveys); drop: "
             "in-distribution minus held-out r on the features both define; new galaxies: held-out galaxies with no "
             f"twin within {data.get('twin_radius_arcsec', 1.0):g} arcsec in the run's training surveys' train "
             "splits (for a pair: new to both runs), twins: the others.</p>",
             _table(["run", "trained on", "in-distribution r", "held-out r [95% CI]", "new galaxies", "twins", "R^2",
                     "MAE", "drop in r"], rows),
             _table(["pair (paired bootstrap)", "difference in r", "P(difference > 0)", "on new galaxies",
                     "difference in MAE"], pairs),
             _table(["question"] + list(data["runs"]), question_rows)]
    if gains:
        parts.append(_img(plots.gain_plot(data["questions"], gains, f"per-question gain in r on {data['held_out']}"),
                          "per-question gain"))
    return "\n".join(parts)


def _subset(sub: dict | None, value: str, ci: str) -> str:
    if not sub:
        return "-"
    return f"{_num(sub[value], sub[ci]) if sub[value] is not None else 'too few'} (n={sub['n']})"


def robustness_section(data: dict) -> str:
    parts = [f"<h2>Robustness on {html.escape(data['survey'])} ({data['n']} galaxies)</h2>",
             _model_line(data.get("model", {})),
             f"<p class=note>Perturbations act on the rendered images ({data['arcsec_per_px']:.3f} arcsec per pixel) "
             "before the model's resize; shift is the mean absolute change of the predicted fractions."
             + (f" Pixels: {html.escape(data['pixels']['note'])}." if data.get("pixels") else "") + "</p>",
             _img(plots.robustness_curves(data["kinds"]), "robustness curves")]
    if data.get("calibration"):
        cal = data["calibration"]
        parts.append(f"<p class=note>Calibration: coverage of central predictive intervals for each galaxy's vote "
                     f"counts, {html.escape(cal['predictive'])} ({cal['num_answers']} answers): the model's MC-dropout "
                     "spread plus the vote noise of each galaxy's volunteers, so a model equal to the truth lies on "
                     "the diagonal.</p>")
        parts.append(_img(plots.calibration({data["survey"]: cal["curve"]}), "calibration"))
    if data.get("rejects"):
        parts.append(f"<p class=note>{len(data['rejects'])} unreadable samples were skipped (rejects.parquet names "
                     "each key, shard and reason).</p>")
    return "\n".join(parts)


def agree_section(data: dict) -> str:
    radius = data.get("radius_arcsec")
    parts = ["<h2>Cross-survey agreement: the same galaxy in two surveys</h2>",
             "<p>Pearson r between the model's predictions for a galaxy's two copies, next to r between the two "
             "surveys' volunteer fractions, on the same pairs (both surveys have the answer from at least 2 votes; "
             "pairs: one-to-one nearest partners" + (f" within {radius:g} arcsec" if radius else "") + "); "
             "intervals resample pairs, the same resamples for both, so the difference is paired.</p>"]
    rows = [[html.escape(label), f"{res['n_predicted']} / {res['n_pairs']}",
             _num(res["mean"]["model"]["r"], res["mean"]["model"]["r_ci"]),
             _num(res["mean"]["volunteers"]["r"], res["mean"]["volunteers"]["r_ci"]),
             _num(res["mean"]["difference"]["diff"], res["mean"]["difference"]["ci"]),
             str(res["mean"]["model"]["num_features"])] for label, res in data["survey_pairs"].items()]
    parts.append(_table(["survey pair", "pairs predicted", "model mean r [95% CI]", "volunteers mean r",
                         "model - volunteers", "features"], rows))
    if data["survey_pairs"]:
        parts.append(_img(plots.agreement_bars(data["survey_pairs"]), "cross-survey agreement"))
    for label, res in data["survey_pairs"].items():
        feature_rows = [[html.escape(name), str(f["model"]["n"]), _num(f["model"]["r"], f["model"]["r_ci"]),
                         _num(f["volunteers"]["r"], f["volunteers"]["r_ci"]),
                         _num(f["difference"]["diff"], f["difference"]["ci"]), str(f["model_all_pairs"]["n"]),
                         _num(f["model_all_pairs"]["r"])] for name, f in res["features"].items()]
        skipped = "".join(f"<p class=note>skipped {html.escape(n)}: {html.escape(why)}</p>"
                          for n, why in res["skipped"].items())
        parts.append(f"<details><summary>{html.escape(label)}: every feature</summary>"
                     + _table(["feature", "pairs", "model r [95% CI]", "volunteers r", "model - volunteers",
                               "all predicted pairs", "model r on all"], feature_rows) + skipped + "</details>")
    parts += [f"<p class=note>survey pair {html.escape(label)} skipped: {html.escape(why)}.</p>"
              for label, why in data.get("skipped_survey_pairs", {}).items()]
    if data.get("note"):
        parts.append(f"<p class=note>{html.escape(data['note'])}.</p>")
    return "\n".join(parts)


SECTIONS = {"metrics": metrics_section, "compare": compare_section, "ood": ood_section,
            "robustness": robustness_section, "agree": agree_section}


def build_report(paths: list[str], worst: int = 12) -> str:
    sections = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            kind = kind_of(data)
        except (OSError, json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
        try:
            sections.append(metrics_section(data, worst) if kind == "metrics" else SECTIONS[kind](data))
        except KeyError as err:
            # JSON of an older release (e.g. ood's pooled in-distribution r, now per survey): say so, not a traceback.
            raise ValueError(f"{path}: a {kind} JSON without the field {err}, probably written by an older release; "
                             f"re-run `python -m eval {kind}` to rebuild it") from None
    listing = "".join(f"<li>{html.escape(str(p))}</li>" for p in paths)
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>Galaxy Sommelier evaluation</title>"
            f"<style>{STYLE}</style></head><body><h1>Galaxy Sommelier evaluation report</h1>"
            f"<p class=note>Built from:</p><ul class=note>{listing}</ul>{''.join(sections)}</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        page = build_report(args.inputs, args.worst)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(f"wrote {out} ({len(page) / 1e6:.1f} MB, {page.count('<img')} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
