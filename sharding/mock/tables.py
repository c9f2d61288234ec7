"""The mock catalog with the survey's native column names, its required-column check, and table writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sharding.mock.tree import NativeNames, Question
from sharding.mock.volunteers import fractions, question_total
from sharding.registry import SurveyConfig

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".fits": "fits", ".fit": "fits"}
FILE_LOC = "file_loc"


def table_format(path: str | Path, fallback: str) -> str:
    """csv | parquet | fits from the file extension; `fallback` (MockSpec.catalog_format) when it says none."""
    fmt = FORMATS.get(Path(path).suffix.lower(), fallback)
    if fmt not in ("csv", "parquet", "fits"):
        raise ValueError(f"cannot tell the table format of {path}: use a .csv, .parquet or .fits name, or set "
                         f"mock.catalog_format to csv, parquet or fits (got {fallback!r})")
    return fmt


def vote_columns(survey: SurveyConfig, tree: list[Question], names: NativeNames, num_classifications: int,
                 votes: dict[str, int]) -> dict[str, float | int]:
    """One galaxy's native vote columns: per question [total], then per answer count and fraction."""
    row: dict[str, float | int] = {}
    if survey.mock.native_columns == "hart16":
        # GZ2 (Hart et al. 2016) carries per-galaxy totals instead of per-question totals.
        row["total_classifications"] = num_classifications
        row["total_votes"] = int(sum(votes.values()))
    for q in tree:
        if q.name in names.totals:
            row[names.totals[q.name]] = question_total(q, votes)
        fraction = fractions(q, votes)
        for a in q.answers:
            count_col, fraction_col = names.answers[q.column(a)]
            row[count_col] = votes[q.column(a)]
            row[fraction_col] = fraction[q.column(a)]
    return row


def required_columns(survey: SurveyConfig) -> list[str]:
    """Every catalog column the survey YAML refers to: id, ra, dec, feature counts/fractions, totals."""
    cols = [survey.id_column, survey.ra_column, survey.dec_column]
    for feature in survey.features:
        cols += survey.count_columns(feature) + survey.fraction_columns(feature)
    cols += [c for totals in survey.question_totals.values() for c in totals]
    if survey.mock.write_file_loc:
        cols.append(FILE_LOC)
    return list(dict.fromkeys(cols))


def check_required(survey: SurveyConfig, columns) -> None:
    missing = [c for c in required_columns(survey) if c not in set(columns)]
    if missing:
        raise ValueError(f"survey {survey.name}: the mock catalog lacks column(s) {missing[:8]} that "
                         f"configs/surveys/{survey.name}.yaml names; check its features/question_totals against "
                         f"campaign {survey.campaign!r} and mock.native_columns={survey.mock.native_columns!r}")


def write_table(frame: pd.DataFrame, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        from astropy.table import Table
        table = Table.from_pandas(frame)
        table.write(path, format="fits", overwrite=True)


def nan_row(frame: pd.DataFrame, row: int, columns: list[str]) -> pd.DataFrame:
    """Blank every vote column of one row (NaN), promoting integer columns to float as pandas must."""
    for col in columns:
        if not pd.api.types.is_float_dtype(frame[col]):
            frame[col] = frame[col].astype(np.float64)
        frame.loc[row, col] = np.nan
    return frame
