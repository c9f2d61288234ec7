"""The standard morphology feature schema: named, ordered features grouped by question."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from sharding.config import CONFIG_ROOT, from_dict, read_yaml

DEFAULT_SCHEMA = CONFIG_ROOT / "features" / "standard26.yaml"


@dataclass(frozen=True)
class Feature:
    name: str
    answer: str
    mapping: Literal["exact", "merged", "approximate"] = "exact"
    note: str = ""


@dataclass(frozen=True)
class Question:
    name: str
    features: list[Feature]
    text: str = ""


@dataclass(frozen=True)
class FeatureSchema:
    name: str
    version: int
    questions: list[Question]
    features: tuple[Feature, ...] = field(init=False)

    def __post_init__(self):
        features = tuple(f for q in self.questions for f in q.features)
        object.__setattr__(self, "features", features)
        names = [f.name for f in features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature schema {self.name!r}: duplicated feature names {dupes}")
        for q in self.questions:
            for f in q.features:
                if f.name != f"{q.name}_{f.answer}":
                    raise ValueError(f"feature schema {self.name!r}: feature {f.name!r} must be named "
                                     f"'<question>_<answer>' = {q.name}_{f.answer!s}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def question_names(self) -> list[str]:
        return [q.name for q in self.questions]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown feature {name!r}; the {self.name} schema has {self.names}") from None

    def question_of(self, feature: str) -> str:
        return next(q.name for q in self.questions if any(f.name == feature for f in q.features))

    def question_slices(self) -> list[tuple[str, slice]]:
        """(question, slice into the ordered feature vector) for every question, in order."""
        out, start = [], 0
        for q in self.questions:
            out.append((q.name, slice(start, start + len(q.features))))
            start += len(q.features)
        return out


def votes_column(feature: str) -> str:
    """labels.parquet column holding a feature's volunteer vote count."""
    return f"{feature}_votes"


def total_votes_column(question: str) -> str:
    """labels.parquet column holding a question's total vote count."""
    return f"{question}_total-votes"


NATIVE_PREFIX = "native:"


@lru_cache(maxsize=8)
def _load(path: str) -> FeatureSchema:
    return from_dict(FeatureSchema, read_yaml(path), where=path)


def load_schema(path: str | Path | None = None) -> FeatureSchema:
    """Load a feature schema YAML (default: configs/features/standard26.yaml)."""
    return _load(str(Path(path or DEFAULT_SCHEMA).resolve()))
