"""A campaign's Galaxy Zoo decision tree and its native catalog column names, read from sharding/gz_schemas."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd

from sharding.registry import SurveyConfig

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "gz_schemas"
ORTHO_SCHEMAS = SCHEMA_DIR / "gz_ortho_schemas_long.csv"
NATIVE_TABLES = {"hart16": SCHEMA_DIR / "gz2_hart16_to_ortho.csv",
                 "willett17": SCHEMA_DIR / "gz_hubble_willett17_to_ortho.csv"}
# Campaign question names that differ from the canonical (standard-schema) question name.
QUESTION_ALIASES = {"bulge-shape": "edge-on-bulge"}
# (canonical question, campaign answer) -> canonical answer, for answers campaigns spell differently.
ANSWER_ALIASES = {
    ("smooth-or-featured", "features"): "featured-or-disk",
    ("how-rounded", "completely"): "round",
    ("how-rounded", "cigar"): "cigar-shaped",
    ("edge-on-bulge", "round"): "rounded",
    ("edge-on-bulge", "no-bulge"): "none",
    ("spiral-arm-count", "5-plus"): "more-than-4",
    ("bulge-size", "no"): "none",
}
# Raw GZ2/GZH tasks outside the ortho schemas that the mock still writes (odd features are answered after
# "something odd = yes"; GZ2's t08 is multi-select, here one answer per volunteer): task -> (question, parent).
NATIVE_ONLY_TASKS = {"odd": ("something-odd", ""), "odd_feature": ("odd-feature", "something-odd_yes")}
_RAW_ANSWER = re.compile(r"^t\d+_(?P<task>[a-z_]+?)_a\d+_(?P<answer>[a-z0-9_]+)$")


@dataclass(frozen=True)
class Question:
    """One question of a campaign's tree: ortho name (e.g. bar-dr5), answers as the campaign spells them."""
    name: str
    canonical: str  # e.g. bar, edge-on-bulge
    answers: tuple[str, ...]  # e.g. (strong, weak, no)
    canonical_answers: tuple[str, ...]
    depends_on: str  # "<parent question>_<answer>", or "" for a root question

    def column(self, answer: str) -> str:
        """The ortho vote-count column name of one answer, e.g. bar-dr5_strong."""
        return f"{self.name}_{answer}"


def campaign_suffix(questions: list[str]) -> str:
    """The '-<campaign>' suffix every ortho question name of a campaign ends with (e.g. '-dr5')."""
    suffix = "-" + questions[0].rsplit("-", 1)[-1]
    if not all(q.endswith(suffix) for q in questions):
        raise ValueError(f"questions {questions} do not share a campaign suffix")
    return suffix


def canonical_question(name: str, suffix: str) -> str:
    base = name[: -len(suffix)] if name.endswith(suffix) else name
    return QUESTION_ALIASES.get(base, base)


def _question(name: str, suffix: str, answers: list[str], depends_on: str) -> Question:
    canonical = canonical_question(name, suffix)
    return Question(name, canonical, tuple(answers),
                    tuple(ANSWER_ALIASES.get((canonical, a), a) for a in answers), depends_on)


@lru_cache(maxsize=16)
def _ortho_rows(campaign: str) -> pd.DataFrame:
    table = pd.read_csv(ORTHO_SCHEMAS, dtype=str, keep_default_na=False)
    rows = table[table["schema"] == campaign].drop_duplicates(["question", "answer_suffix"])
    if rows.empty:
        known = sorted(set(table["schema"]))
        raise ValueError(f"campaign {campaign!r} is not in {ORTHO_SCHEMAS.name}; known campaigns: {known}")
    return rows


def _native_only_questions(style: str, suffix: str, existing: set[str]) -> list[Question]:
    """Raw-catalog tasks without an ortho name (GZ2/GZH odd features), as extra tree questions."""
    if style not in NATIVE_TABLES:
        return []
    out = []
    for task, (base, parent) in NATIVE_ONLY_TASKS.items():
        name = base + suffix
        answers = [match["answer"].replace("_", "-") for prefix, ortho in _native_table(style)
                   if not ortho and (match := _RAW_ANSWER.match(prefix)) and match["task"] == task]
        if answers and name not in existing:
            depends = parent.replace("_", suffix + "_", 1) if parent else ""
            out.append(_question(name, suffix, answers, depends))
    return out


def load_tree(survey: SurveyConfig) -> list[Question]:
    """The survey campaign's questions, parents before children (a topological order of depends_on)."""
    rows = _ortho_rows(survey.campaign)
    names = list(dict.fromkeys(rows["question"]))
    suffix = campaign_suffix(names)
    questions = []
    for name in names:
        part = rows[rows["question"] == name]
        answers = [a.lstrip("_") for a in part["answer_suffix"]]
        questions.append(_question(name, suffix, answers, part["depends_on"].iloc[0].strip()))
    questions += _native_only_questions(survey.mock.native_columns, suffix, set(names))
    return _topological(questions)


def _topological(questions: list[Question]) -> list[Question]:
    """Parents before children, otherwise keeping the schema's order (it decides the catalog's column order)."""
    by_answer = {q.column(a): q.name for q in questions for a in q.answers}
    ordered: list[Question] = []
    placed: set[str] = set()
    pending = list(questions)
    while pending:
        ready = next((q for q in pending if not q.depends_on or by_answer.get(q.depends_on) in placed), None)
        if ready is None:
            broken = [(q.name, q.depends_on) for q in pending]
            raise ValueError(f"decision tree has unknown or circular dependencies: {broken}")
        ordered.append(ready)
        placed.add(ready.name)
        pending.remove(ready)
    return ordered


@lru_cache(maxsize=4)
def _native_table(style: str) -> tuple[tuple[str, str], ...]:
    table = pd.read_csv(NATIVE_TABLES[style], dtype=str, keep_default_na=False)
    prefix_col = table.columns[0]
    return tuple(zip(table[prefix_col], table["galaxy_datasets_ortho_col"]))


def _native_prefix(style: str, suffix: str) -> dict[str, str]:
    """Ortho answer column -> raw answer prefix (e.g. bar-gz2_yes -> t03_bar_a06_bar)."""
    out = {}
    for prefix, ortho in _native_table(style):
        match = _RAW_ANSWER.match(prefix)
        if not ortho and match and match["task"] in NATIVE_ONLY_TASKS:
            ortho = NATIVE_ONLY_TASKS[match["task"]][0] + suffix + "_" + match["answer"].replace("_", "-")
        if ortho:
            out[ortho] = prefix
    return out


@dataclass(frozen=True)
class NativeNames:
    """Catalog column names of one campaign: per ortho answer column (count, fraction); per question total."""
    answers: dict[str, tuple[str, str]]
    totals: dict[str, str]  # ortho question -> its total-votes column (absent in GZ2/GZH raw tables)


def native_names(survey: SurveyConfig, tree: list[Question]) -> NativeNames:
    """Column names as the survey's real catalog spells them (MockSpec.native_columns chooses the style)."""
    style = survey.mock.native_columns
    suffix = campaign_suffix([q.name for q in tree])
    answers: dict[str, tuple[str, str]] = {}
    totals: dict[str, str] = {}
    prefixes = _native_prefix(style, suffix) if style in NATIVE_TABLES else {}
    for q in tree:
        for a in q.answers:
            ortho = q.column(a)
            if style in NATIVE_TABLES:
                if ortho not in prefixes:
                    raise ValueError(f"{NATIVE_TABLES[style].name} has no raw column for {ortho}; "
                                     f"survey {survey.name} cannot use mock.native_columns={style}")
                base, count_suffix = prefixes[ortho], "_count"
            elif style == "strip-campaign":
                base, count_suffix = ortho.replace(suffix + "_", "_", 1), ""
            else:
                base, count_suffix = ortho, ""
            answers[ortho] = (base + count_suffix, base + "_fraction")
        if style == "strip-campaign":
            totals[q.name] = q.name[: -len(suffix)] + "_total-votes"
        elif style == "ortho":
            totals[q.name] = q.name + "_total-votes"
    return NativeNames(answers, totals)
