"""`python -m eval <job> ...`: the offline evaluation jobs; `python -m eval <job> --help` explains each."""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "predict": ("eval.predict", "predict features (and embeddings) from shards or a catalog + image folder"),
    "metrics": ("eval.score", "score predictions against labels per survey and feature, with intervals"),
    "compare": ("eval.compare", "compare models on the features they share by NAME, with paired intervals"),
    "ood": ("eval.ood", "the held-out-survey study: several runs on a survey none of them saw"),
    "robustness": ("eval.robustness", "metrics and prediction shifts under resolution, noise, blur, rotation"),
    "match": ("eval.match", "cross-match surveys by position: one-to-one nearest partners within a radius"),
    "agree": ("eval.agree", "does the model agree with itself on the same galaxy in two surveys, vs volunteers?"),
    "neighbors": ("eval.neighbors", "most similar galaxies by embedding (cosine), with a contact sheet"),
    "select": ("eval.select_job", "active learning: the galaxies volunteers should label next (BALD, k-center)"),
    "drift": ("eval.drift_job", "do new embeddings still look like the training surveys'? (MMD, kNN tests)"),
    "report": ("eval.report", "one self-contained HTML report from the JSON outputs"),
}

USAGE = "usage: python -m eval <job> [options]   (python -m eval <job> --help)\n\njobs:\n" + "\n".join(
    f"  {name:<11} {text}" for name, (_, text) in JOBS.items()) + """

a typical held-out-survey evaluation:
  python -m eval predict --model runs/mixed --shards data/shards --surveys ukidss --split all --out ukidss.parquet
  python -m eval metrics ukidss.parquet --json ukidss.json
  python -m eval report ukidss.json --out report.html"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    job = argv[0]
    if job not in JOBS:
        print(f"error: unknown job {job!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return importlib.import_module(JOBS[job][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
