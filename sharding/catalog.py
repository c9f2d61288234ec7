"""Galaxy Zoo catalogs: reading CSV/Parquet/FITS tables, mapping native columns to standard features, row checks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sharding.registry import SurveyConfig, survey_path
from sharding.sky import assign_splits, split_of  # noqa: F401 - split_of is part of this module's API
from sharding.schema import NATIVE_PREFIX, FeatureSchema, total_votes_column, votes_column

FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fts")
FRACTION_TOLERANCE = 1e-3
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_+-]")


@dataclass(frozen=True)
class Reject:
    """One input that did not become a sample, with enough context to find and fix it."""
    stage: str  # "catalog" or "image"
    reason: str
    detail: str
    row: int  # 0-based data row in the catalog (-1 when not tied to a row)
    object_id: str = ""
    file: str = ""


def read_catalog(path: str | Path) -> pd.DataFrame:
    """Read a catalog from CSV, Parquet or a FITS table, keeping its native column names."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"catalog not found: {path}. Pass --catalog PATH, or generate mock data with "
                         f"`python -m sharding.mock --survey <name>`.")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        if name.endswith(FITS_SUFFIXES):
            from astropy.table import Table
            table = Table.read(path)
            multidim = [c for c in table.colnames if len(table[c].shape) > 1]
            table.remove_columns(multidim)
            return table.to_pandas()
        if name.endswith((".csv", ".csv.gz", ".txt")):
            return pd.read_csv(path, low_memory=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read catalog {path}: {err}") from err
    raise ValueError(f"catalog {path}: unsupported format; use .csv, .parquet or a FITS table (.fits)")


def answer_columns(survey: SurveyConfig) -> list[str]:
    """Every native column that can carry a vote for the survey: counts, fractions and question totals."""
    cols = [c for f in survey.features for c in (*survey.count_columns(f), *survey.fraction_columns(f))]
    cols += [c for cs in survey.question_totals.values() for c in cs]
    return list(dict.fromkeys(cols))


def has_answers(columns, survey: SurveyConfig) -> bool:
    """Whether a catalog holds any of the survey's answer columns (none: an unlabeled catalog)."""
    return bool(set(columns) & set(answer_columns(survey)))


def check_columns(columns, survey: SurveyConfig, catalog_path: str | Path, labelled: bool = True) -> None:
    """Fail at once, naming the column and the survey YAML to fix, when a required column is absent.

    An unlabeled build needs only the id and position columns.
    """
    have = set(columns)
    missing = [c for c in (survey.id_column, survey.ra_column, survey.dec_column) if c not in have]
    for feature in survey.features if labelled else ():
        fractions = survey.fraction_columns(feature)
        counts = survey.count_columns(feature)
        if all(c in have for c in fractions) or all(c in have for c in counts):
            continue
        missing.extend(c for c in counts if c not in have)
    for question, cols in survey.question_totals.items() if labelled else ():
        uses_counts = any(all(c in have for c in survey.count_columns(f)) for f in survey.features
                          if f.split("_", 1)[0] == question)
        if uses_counts:
            missing.extend(c for c in cols if c not in have)
    if missing:
        missing = list(dict.fromkeys(missing))
        raise ValueError(f"catalog {catalog_path} lacks required column(s) {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''} for survey {survey.name!r}. Fix the column "
                         f"names in {_yaml_of(survey)} (id_column, ra_column, dec_column, features, "
                         f"question_totals) or the catalog.")


def _yaml_of(survey: SurveyConfig) -> str:
    """The YAML a registered survey came from, or words for one that is not registered (a derived survey)."""
    try:
        return str(survey_path(survey.name))
    except ValueError:
        return f"the {survey.name} survey YAML"


def make_key(survey: str, object_id: str) -> str:
    """Sample key `<survey>_<id>` without characters DALI or tar paths cannot take ('.' becomes 'p')."""
    safe = _UNSAFE_KEY_CHARS.sub("_", str(object_id).replace(".", "p"))
    return f"{survey}_{safe}"


def normalise_ids(values: pd.Series) -> pd.Series:
    """Object ids as strings; integral floats (from CSV NaN promotion) lose their '.0'."""
    if pd.api.types.is_float_dtype(values):
        return values.map(lambda v: "" if pd.isna(v) else (str(int(v)) if float(v).is_integer() else str(v)))
    return values.map(lambda v: "" if pd.isna(v) else (v.decode() if isinstance(v, bytes) else str(v)).strip())


def _sum_columns(df: pd.DataFrame, cols: list[str]) -> np.ndarray | None:
    if not cols or not all(c in df.columns for c in cols):
        return None
    return df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64).sum(axis=1)


def _vote_columns(df: pd.DataFrame, survey: SurveyConfig) -> list[str]:
    cols = [c for f in survey.features for c in survey.count_columns(f) if c in df.columns]
    cols += [c for cs in survey.question_totals.values() for c in cs if c in df.columns]
    return list(dict.fromkeys(cols))


def row_rejects(df: pd.DataFrame, survey: SurveyConfig, ids: pd.Series, labelled: bool = True) -> dict[int, Reject]:
    """Rows that cannot be samples: missing or duplicated ids, bad coordinates, NaN or negative votes (the votes
    only when labelled: an unlabeled build ignores any vote columns)."""
    rejects: dict[int, Reject] = {}

    def add(mask: np.ndarray, reason: str, detail_of) -> None:
        for i in np.flatnonzero(mask):
            if int(i) not in rejects:
                rejects[int(i)] = Reject("catalog", reason, detail_of(int(i)), int(i), ids.iat[i])

    add((ids == "").to_numpy(), "missing-id", lambda i: f"empty {survey.id_column}")
    first_row = {}
    dup = np.zeros(len(df), dtype=bool)
    for i, oid in enumerate(ids):
        if oid and oid in first_row:
            dup[i] = True
        else:
            first_row.setdefault(oid, i)
    add(dup, "duplicate-id", lambda i: f"{survey.id_column}={ids.iat[i]} already used by row {first_row[ids.iat[i]]}")
    coords = df[[survey.ra_column, survey.dec_column]].apply(pd.to_numeric, errors="coerce").to_numpy()
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(coords).all(axis=1) | (np.abs(coords[:, 1]) > 90)
    add(bad, "bad-coordinates", lambda i: f"ra/dec = {coords[i].tolist()} (dec must lie in [-90, 90] degrees)")
    vote_cols = _vote_columns(df, survey) if labelled else []
    if vote_cols:
        votes = df[vote_cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        nan = ~np.isfinite(votes)
        add(nan.any(axis=1), "nan-votes",
            lambda i: "non-finite votes in " + ", ".join(np.asarray(vote_cols)[nan[i]][:5]))
        neg = np.nan_to_num(votes) < 0
        add(neg.any(axis=1), "negative-votes",
            lambda i: "negative votes in " + ", ".join(np.asarray(vote_cols)[neg[i]][:5]))
    return rejects


def map_labels(df: pd.DataFrame, survey: SurveyConfig, schema: FeatureSchema) -> pd.DataFrame:
    """Standard feature fractions, vote counts per feature and total votes per question, by name.

    Features the survey does not map are NaN (absent, never 0); a question that got no votes has
    NaN fractions (undefined) but keeps its zero counts, which count-aware losses can use.
    """
    out: dict[str, np.ndarray] = {}
    totals: dict[str, np.ndarray] = {}
    nan = np.full(len(df), np.nan)
    for question in schema.question_names:
        total = _sum_columns(df, survey.question_totals.get(question, []))
        totals[question] = nan if total is None else total
    for feature in schema.features:
        question = schema.question_of(feature.name)
        counts = _sum_columns(df, survey.count_columns(feature.name))
        fraction = _sum_columns(df, survey.fraction_columns(feature.name))
        total = totals[question]
        if fraction is None and counts is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                fraction = counts / total
        if fraction is None:
            fraction = nan
        fraction = np.where(total == 0, np.nan, fraction)
        out[feature.name] = fraction.astype(np.float32)
        out[votes_column(feature.name)] = (nan if counts is None else counts).astype(np.float32)
    for question, total in totals.items():
        out[total_votes_column(question)] = total.astype(np.float32)
    return pd.DataFrame(out, index=df.index)


def unlabeled_labels(index: pd.Index, schema: FeatureSchema) -> pd.DataFrame:
    """The label columns of an unlabeled survey: every feature NaN (absent) and zero votes.

    Zero votes, not NaN: a count-aware loss sees "no volunteer answered", and the loaders' masks (from the NaN
    fractions) keep the galaxy out of every supervised loss.
    """
    out: dict[str, np.ndarray] = {}
    for feature in schema.names:
        out[feature] = np.full(len(index), np.nan, np.float32)
    for feature in schema.names:
        out[votes_column(feature)] = np.zeros(len(index), np.float32)
    for question in schema.question_names:
        out[total_votes_column(question)] = np.zeros(len(index), np.float32)
    return pd.DataFrame(out, index=index)


def fraction_rejects(labels: pd.DataFrame, schema: FeatureSchema, ids: pd.Series) -> dict[int, Reject]:
    """Rows whose vote fractions are outside [0, 1]: a catalog error, not a galaxy."""
    values = labels[schema.names].to_numpy(dtype=np.float64)
    bad = np.nan_to_num(values, nan=0.5)
    bad = (bad < -FRACTION_TOLERANCE) | (bad > 1 + FRACTION_TOLERANCE)
    names = np.asarray(schema.names)
    return {int(i): Reject("catalog", "bad-fraction", "fraction outside [0, 1] for " + ", ".join(names[bad[i]][:5]),
                           int(i), ids.iat[i]) for i in np.flatnonzero(bad.any(axis=1))}


def parse_splits(text: str) -> dict[str, float]:
    """'train=0.8,val=0.1,test=0.1' -> ordered dict of fractions summing to 1."""
    splits: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            splits[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--splits {text!r}: {part!r} is not name=fraction") from None
    if not splits or any(v < 0 for v in splits.values()) or abs(sum(splits.values()) - 1) > 1e-6:
        raise ValueError(f"--splits {text!r}: fractions must be non-negative and sum to 1")
    if any(not re.fullmatch(r"[a-z0-9]+", name) for name in splits):
        raise ValueError(f"--splits {text!r}: split names must be lower-case letters/digits")
    return splits


def load_labels(df: pd.DataFrame, survey: SurveyConfig, schema: FeatureSchema, splits: dict[str, float],
                labelled: bool = True, rule: dict | None = None) -> tuple[pd.DataFrame, list[Reject]]:
    """Accepted rows with key, id, coordinates, split, standard labels and native columns; and the row rejects.

    `rule` is a sharding.sky split rule (default: by object id).
    `labelled=False` (an unlabeled survey): the standard labels are unlabeled_labels, whatever vote columns the
    catalog holds, and only ids and coordinates can reject a row.
    """
    ids = normalise_ids(df[survey.id_column]).reset_index(drop=True)
    df = df.reset_index(drop=True)
    labels = map_labels(df, survey, schema) if labelled else unlabeled_labels(df.index, schema)
    rejects = row_rejects(df, survey, ids, labelled)
    for i, rej in fraction_rejects(labels, schema, ids).items():
        rejects.setdefault(i, rej)
    keys = ids.map(lambda oid: make_key(survey.name, oid))
    first_key: dict[str, int] = {}
    for i, key in enumerate(keys):
        if i in rejects:
            continue
        if key in first_key:
            rejects[i] = Reject("catalog", "duplicate-key",
                                f"key {key} (from id {ids.iat[i]}) collides with row {first_key[key]}", i, ids.iat[i])
        else:
            first_key[key] = i
    accepted = np.array([i not in rejects for i in range(len(df))], dtype=bool)
    ra = pd.to_numeric(df[survey.ra_column], errors="coerce")
    dec = pd.to_numeric(df[survey.dec_column], errors="coerce")
    base = pd.DataFrame({
        "key": keys, "object_id": ids, "survey": survey.name, "ra": ra, "dec": dec,
        "row": np.arange(len(df), dtype=np.int64),
        "split": assign_splits(ids, ra.to_numpy(), dec.to_numpy(), splits, rule or {"split_by": "id"}),
    })
    if "file_loc" in df.columns:
        base["file_loc"] = df["file_loc"].astype(str)
    native = df.drop(columns=[survey.id_column]).add_prefix(NATIVE_PREFIX)
    for col in native.columns:
        if native[col].dtype == object:
            native[col] = native[col].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v))
                                          else (v.decode() if isinstance(v, bytes) else str(v)))
    full = pd.concat([base, labels, native], axis=1)
    return full[accepted].reset_index(drop=True), [rejects[i] for i in sorted(rejects)]
