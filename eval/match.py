"""`python -m eval match`: the same galaxies in several surveys, by position: one-to-one nearest partners.

Every pair of the given surveys is matched on the sky (astropy `search_around_sky`, then mutual nearest partners
within the radius), so a galaxy of either survey is in at most one pair with a given other survey. The pairs table
feeds `python -m eval agree`, which asks whether the model gives a galaxy the same answers in both surveys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from eval.store import METADATA_KEY
from sharding import sky

PAIR_COLUMNS = ("survey_a", "key_a", "object_id_a", "survey_b", "key_b", "object_id_b", "sep_arcsec")
RADIUS_BINS = (0.25, 0.5, 1.0)  # summary counts of pairs closer than these fractions of the radius

EXAMPLES = """examples:
  python -m eval match --shards data/shards --surveys sdss,decals --out reports/pairs.parquet
  python -m eval match --shards data/shards --surveys sdss,decals,ukidss --radius 0.5 --out pairs.parquet
  python -m eval agree --pairs pairs.parquet --predictions sdss.parquet decals.parquet --out agree.json
Writes pairs.parquet (survey_a, key_a, object_id_a, survey_b, key_b, object_id_b, sep_arcsec: one row per pair)
and, next to it, pairs.json (the per survey pair summary printed here)."""


# The matching rule lives in sharding (sharding.verify --across uses it too); eval names it for its users.
match_positions, valid_positions = sky.match_positions, sky.valid_positions


def survey_folders(shards: Path) -> list[str]:
    """Survey folders under a shard root: those holding a labels table or a manifest."""
    shards = Path(shards)
    if not shards.is_dir():
        return []
    return sorted(p.name for p in shards.iterdir()
                  if p.is_dir() and ((p / "labels.parquet").is_file() or (p / "manifest.json").is_file()))


def labels_path(shards: Path, survey: str) -> Path:
    """The survey's labels table: the one its manifest names, else labels.parquet."""
    directory = Path(shards) / survey
    manifest = directory / "manifest.json"
    name = json.loads(manifest.read_text()).get("labels", "labels.parquet") if manifest.is_file() else "labels.parquet"
    return directory / name


def check_surveys(shards: Path, surveys: list[str]) -> None:
    present = survey_folders(shards)
    unknown = [s for s in surveys if s not in present]
    if unknown:
        raise ValueError(f"no survey folder {', '.join(str(Path(shards) / s) for s in unknown)} with a labels.parquet; "
                         f"{shards} holds {present or 'no survey folders'}")
    if len(set(surveys)) != len(surveys) or len(surveys) < 2:
        raise ValueError(f"--surveys needs at least two different surveys, got {surveys}")


def read_positions(shards: Path, survey: str, columns: tuple[str, ...] = ("key", "object_id", "ra", "dec")) \
        -> pd.DataFrame:
    """`columns` of every row of a survey's labels table (only those are read)."""
    path = labels_path(shards, survey)
    missing = [c for c in columns if c not in pq.read_schema(path).names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; is this a labels table of sharding.build?")
    return pd.read_parquet(path, columns=list(columns))


def pair_summary(a: str, b: str, table_a: pd.DataFrame, table_b: pd.DataFrame, sep: np.ndarray,
                 radius_arcsec: float) -> dict:
    """Counts of one survey pair: rows, rows without a position, pairs, median separation, pairs per radius bin."""
    within = {f"<{f:g}r": int((sep < f * radius_arcsec).sum()) for f in RADIUS_BINS[:-1]}
    within[f"<={RADIUS_BINS[-1]:g}r"] = int((sep <= RADIUS_BINS[-1] * radius_arcsec).sum())
    return {"survey_a": a, "survey_b": b, "n_a": len(table_a), "n_b": len(table_b),
            "no_position_a": int((~valid_positions(table_a["ra"], table_a["dec"])).sum()),
            "no_position_b": int((~valid_positions(table_b["ra"], table_b["dec"])).sum()),
            "pairs": int(len(sep)), "median_sep_arcsec": float(np.median(sep)) if len(sep) else float("nan"),
            "within": within}


def _column(table: pd.DataFrame, name: str, rows: np.ndarray) -> np.ndarray:
    return table[name].astype(str).to_numpy()[rows]


def match_all(shards: Path, surveys: list[str], radius_arcsec: float) -> tuple[pd.DataFrame, list[dict]]:
    """(pairs table, one summary per survey pair) for every pair of `surveys`, in the order given."""
    if not radius_arcsec > 0:
        raise ValueError(f"--radius must be > 0 arcsec, got {radius_arcsec}")
    check_surveys(shards, surveys)
    tables = {s: read_positions(shards, s) for s in surveys}
    frames, summaries = [], []
    for i, a in enumerate(surveys):
        for b in surveys[i + 1:]:
            ta, tb = tables[a], tables[b]
            ia, ib, sep = match_positions(ta["ra"], ta["dec"], tb["ra"], tb["dec"], radius_arcsec)
            frames.append(pd.DataFrame({"survey_a": a, "key_a": _column(ta, "key", ia),
                                        "object_id_a": _column(ta, "object_id", ia), "survey_b": b,
                                        "key_b": _column(tb, "key", ib), "object_id_b": _column(tb, "object_id", ib),
                                        "sep_arcsec": sep}, columns=list(PAIR_COLUMNS)))
            summaries.append(pair_summary(a, b, ta, tb, sep, radius_arcsec))
    pairs = pd.concat(frames, ignore_index=True)
    return pairs.astype({c: str for c in PAIR_COLUMNS[:-1]}).astype({"sep_arcsec": np.float64}), summaries


def match_surveys(shards: Path, surveys: list[str], radius_arcsec: float) -> pd.DataFrame:
    """The pairs table (PAIR_COLUMNS) of every pair of `surveys` under the shard root."""
    return match_all(shards, surveys, radius_arcsec)[0]


def format_summary(summaries: list[dict], radius_arcsec: float) -> str:
    bins = list(summaries[0]["within"]) if summaries else []
    lines = [f"one-to-one nearest partners within {radius_arcsec:g} arcsec (r); median separation in arcsec; "
             "no pos: rows without a valid position",
             f"{'survey pair':<22}{'n_a':>9}{'n_b':>9}{'no pos a':>9}{'no pos b':>9}{'pairs':>9}{'median':>9}"
             + "".join(f"{b:>9}" for b in bins)]
    for s in summaries:
        median = f"{s['median_sep_arcsec']:.3f}" if np.isfinite(s["median_sep_arcsec"]) else "-"
        counts = [s["n_a"], s["n_b"], s["no_position_a"], s["no_position_b"], s["pairs"]]
        lines.append(f"{s['survey_a'] + ' - ' + s['survey_b']:<22}" + "".join(f"{v:>9}" for v in counts)
                     + f"{median:>9}" + "".join(f"{v:>9}" for v in s["within"].values()))
    return "\n".join(lines)


def write_pairs(pairs: pd.DataFrame, out: Path, settings: dict) -> None:
    """The pairs Parquet, carrying its settings (shard root, surveys, radius) in the file's metadata."""
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(pairs, preserve_index=False)
    meta = {**(table.schema.metadata or {}), METADATA_KEY: json.dumps(settings).encode()}
    pq.write_table(table.replace_schema_metadata(meta), out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval match", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cross-match surveys of a shard root by position (every pair of --surveys): astropy "
                    "search_around_sky, then one-to-one mutual nearest partners within --radius, so a galaxy is in "
                    "at most one pair with each other survey. Rows without a valid position are skipped and counted.")
    parser.add_argument("--shards", type=Path, required=True, help="shard root with one folder per survey")
    parser.add_argument("--surveys", required=True, help="comma-separated survey folders, at least two")
    parser.add_argument("--radius", type=float, default=1.0, help="match radius in arcsec (default 1.0)")
    parser.add_argument("--out", type=Path, default=Path("pairs.parquet"),
                        help="pairs Parquet; the summary JSON goes next to it with a .json suffix")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    surveys = [s.strip() for s in args.surveys.split(",") if s.strip()]
    if args.out.suffix == ".json":
        print(f"error: --out {args.out}: give the pairs Parquet path; the summary JSON goes next to it",
              file=sys.stderr)
        return 2
    try:
        pairs, summaries = match_all(args.shards, surveys, args.radius)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = {"shards": str(args.shards), "surveys": surveys, "radius_arcsec": args.radius}
    write_pairs(pairs, args.out, settings)
    summary_path = args.out.with_suffix(".json")
    summary_path.write_text(json.dumps({**settings, "pairs": str(args.out), "survey_pairs": summaries}, indent=2)
                            + "\n")
    print(format_summary(summaries, args.radius))
    print(f"\nwrote {args.out} ({len(pairs)} pairs) and {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
