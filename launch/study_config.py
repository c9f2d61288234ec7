"""A study's YAML (configs/studies/*.yaml): named training arms, the evaluations of their exports and, optionally,
the mock data they train on. Typed dataclasses; unknown keys, unknown arms and cycles are errors, by name."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharding.config import config_file, from_dict, read_yaml

NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # names folders and SLURM jobs (<study>-<arm>)
DATA_NODE = "data"
EVAL_PREFIX = "eval-"


@dataclass(frozen=True)
class ArmConfig:
    """One training run: a train config plus dotted overrides, maybe started from another arm's export."""
    config: str  # configs/train/<name>.yaml, or a path
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, applied after the study's
    # Another arm whose export this one starts from: a supervised parent's whole model (train's init_from); an ssl
    # parent's teacher backbone (model_overrides pretrained=<export>/backbone). It runs once that arm has exported.
    init_from: str | None = None


@dataclass(frozen=True)
class EvaluationConfig:
    """What to measure on some arms' exports once they have all exported (`python -m eval` ood and metrics)."""
    arms: list[str]
    held_out: str | None = None  # eval ood: every arm on all of this survey, none trained on it, and on its own tests
    surveys: list[str] = field(default_factory=list)  # a matrix: every arm scored on each of these surveys' `split`
    split: str = "test"
    pairs: list[list[str]] = field(default_factory=list)  # [a, b]: a - b on the held-out survey, paired bootstrap
    curve: list[str] = field(default_factory=list)  # arms in order: the progressive curve (held-out and ID r)
    bootstrap: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class StudyData:
    """Mock surveys made into the shard root when missing: the graph's first node (sharding.mock, derive, build)."""
    surveys: list[str] = field(default_factory=list)  # mock surveys built with their labels
    num_galaxies: int = 1500  # per mock survey
    seed: int = 0  # of the one mock sky
    corrupt_fraction: float = 0.0
    image_size: int | None = None  # shard image size (default: each survey YAML's)
    workers: int = 2
    unlabeled: dict[str, str] = field(default_factory=dict)  # name -> mock survey built again unlabeled as `name`
    derived: list[str] = field(default_factory=list)  # "<from>_as_<like>": sharding.derive --from --like

    def makes(self) -> list[str]:
        return [*self.surveys, *self.unlabeled, *self.derived]


@dataclass(frozen=True)
class StudyConfig:
    arms: dict[str, ArmConfig]
    evaluations: dict[str, EvaluationConfig] = field(default_factory=dict)
    name: str = ""  # default: the file's stem
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value for every arm
    shards: str | None = None  # default shard root (--shards wins); default <out>/shards with `data`, else data/shards
    nproc: int = 1  # processes per training run when run locally (torchrun when > 1)
    data: StudyData | None = None


def study_file(name_or_path: str | Path) -> Path:
    """A study by path, or by bare name (`tiny` is configs/studies/tiny.yaml)."""
    return config_file("studies", name_or_path)


def load_study(name_or_path: str | Path) -> StudyConfig:
    path = study_file(name_or_path)
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    study = from_dict(StudyConfig, data, where=str(path))
    check(study, str(path))
    return study


def _check_name(kind: str, name: str, where: str) -> None:
    if not NAME.fullmatch(name):
        raise ValueError(f"{where}: {kind} name {name!r} must be lower-case letters, digits, '_' and '-' (it names "
                         "folders and SLURM jobs)")


def check(study: StudyConfig, where: str = "study") -> None:
    """Names, references between arms and evaluations, and no arm starting (indirectly) from itself."""
    _check_name("study", study.name, where)
    if not study.arms:
        raise ValueError(f"{where}: a study needs at least one arm under `arms:`")
    if study.nproc < 1:
        raise ValueError(f"{where}: nproc must be >= 1, got {study.nproc}")
    for name, arm in study.arms.items():
        _check_name("arm", name, where)
        if name == DATA_NODE or name.startswith(EVAL_PREFIX):
            raise ValueError(f"{where}: arm name {name!r} is reserved (the data node, evaluations' jobs)")
        if arm.init_from is not None and arm.init_from not in study.arms:
            raise ValueError(f"{where}: arm {name!r} starts from {arm.init_from!r}, which is not an arm of this study "
                             f"(arms: {sorted(study.arms)})")
    cycle = find_cycle({name: arm.init_from for name, arm in study.arms.items()})
    if cycle:
        raise ValueError(f"{where}: arms start from each other in a cycle: {' -> '.join(cycle)} (init_from)")
    for name, ev in study.evaluations.items():
        _check_evaluation(name, ev, study, where)
    if study.data is not None:
        for name in [*study.data.unlabeled, *study.data.derived]:
            _check_name("survey", name, where)
        for name in study.data.derived:
            if len(name.split("_as_")) != 2 or not all(name.split("_as_")):
                raise ValueError(f"{where}: data.derived {name!r} must read <from>_as_<like>, e.g. hst_as_sdss")
        if study.data.num_galaxies < 1 or study.data.workers < 1:
            raise ValueError(f"{where}: data.num_galaxies and data.workers must be >= 1")


def _check_evaluation(name: str, ev: EvaluationConfig, study: StudyConfig, where: str) -> None:
    label = f"{where}: evaluation {name!r}"
    _check_name("evaluation", name, where)
    unknown = [a for a in ev.arms if a not in study.arms]
    if unknown or not ev.arms:
        raise ValueError(f"{label}: arms {unknown or '[]'} are not arms of this study (arms: {sorted(study.arms)})")
    if ev.held_out is None and not ev.surveys:
        raise ValueError(f"{label}: give a held_out survey (eval ood), surveys to score (a matrix), or both")
    if (ev.pairs or ev.curve) and ev.held_out is None:
        raise ValueError(f"{label}: pairs and curve are read on the held-out survey: set held_out")
    for pair in ev.pairs:
        if len(pair) != 2 or any(a not in ev.arms for a in pair) or pair[0] == pair[1]:
            raise ValueError(f"{label}: each pair is [a, b], two different arms of the evaluation's arms {ev.arms}; "
                             f"got {pair}")
    outside = [a for a in ev.curve if a not in ev.arms]
    if outside:
        raise ValueError(f"{label}: curve arms {outside} are not among the evaluation's arms {ev.arms}")
    if ev.bootstrap < 1:
        raise ValueError(f"{label}: bootstrap must be >= 1")


def find_cycle(parent: dict[str, str | None]) -> list[str] | None:
    """One cycle as [a, ..., a] following each arm's parent (init_from), or None."""
    for start in parent:
        path, node = [start], parent[start]
        while node is not None:
            if node in path:
                return path[path.index(node):] + [node]
            path.append(node)
            node = parent.get(node)
    return None


def dotted_overrides(values: dict[str, Any]) -> list[str]:
    """{"data.mix": "sdss=1", "max_steps": 4} -> ["data.mix=\"sdss=1\"", "max_steps=4"]: JSON values, which the
    overrides' YAML parser reads back as the same strings, numbers, lists and mappings."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]
