"""The study planner: a study YAML -> the nodes to run (data, arms, evaluations) and their dependencies, in an order
that runs every node after the nodes it needs. It reads train configs and checks that the surveys it names exist;
it runs, hashes and submits nothing, so a test can assert on the plan without a scheduler.

Each node carries a `spec`, the JSON-ready description of what it runs and of what its provenance reads
(launch/study_state.py): `hashed` (its settings, with the study's folder and shard root as placeholders, so moving
either changes nothing), `reads` (surveys whose shard manifests it depends on) and `parents` (arms whose exports it
starts from or evaluates).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from launch.study_config import DATA_NODE, EVAL_PREFIX, StudyConfig, dotted_overrides
from sharding.config import to_dict

OUT_PLACEHOLDER, SHARDS_PLACEHOLDER = "<study>", "<shards>"


@dataclass(frozen=True)
class Node:
    name: str  # an arm's name, "eval-<evaluation>" or "data"
    kind: Literal["data", "arm", "eval"]
    deps: tuple[str, ...]  # nodes that must finish first
    spec: dict

    @property
    def dir(self) -> Path:
        return Path(self.spec["dir"])

    @property
    def label(self) -> str:
        return {"arm": f"arm {self.name}", "eval": f"evaluation {self.name[len(EVAL_PREFIX):]}",
                "data": "data"}[self.kind]


def default_shards(study: StudyConfig, out: str | Path) -> str:
    if study.shards:
        return study.shards
    return str(Path(out) / "shards") if study.data is not None else "data/shards"


def plan(study: StudyConfig, out: str | Path, shards: str | Path) -> list[Node]:
    """Every node in an order that runs parents first: the data node, the arms (in the YAML's order, each after the
    arm it starts from), the evaluations."""
    out, shards = str(out), str(shards)
    made = set(study.data.makes()) if study.data is not None else set()
    configs, hashed = resolve_arms(study, out, shards), resolve_arms(study, OUT_PLACEHOLDER, SHARDS_PLACEHOLDER)
    for config in hashed.values():
        config.pop("tracking", None)  # where the run is logged does not change what it computes
    return ([data_node(study, out, shards)] if study.data is not None else []) + \
        [arm_node(study, name, configs[name], hashed[name], out, shards, made) for name in configs] + \
        [eval_node(study, name, configs, out, shards, made) for name in study.evaluations]


def arm_node(study: StudyConfig, name: str, config: dict, hashed: dict, out: str, shards: str,
             made: set[str]) -> Node:
    reads = surveys_read(config)
    check_surveys(f"arm {name!r}", reads, shards, made)
    parent = study.arms[name].init_from
    parents = {parent: export_dir(out, parent)} if parent else {}
    return Node(name, "arm", ((DATA_NODE,) if made & set(reads) else ()) + tuple(parents), {
        "kind": "arm", "name": name, "study": study.name, "dir": config["out_dir"], "config": config, "hashed": hashed,
        "reads": reads, "shards": shards, "nproc": study.nproc, "stage": config["stage"], "parents": parents})


def eval_node(study: StudyConfig, name: str, configs: dict[str, dict], out: str, shards: str,
              made: set[str]) -> Node:
    ev = study.evaluations[name]
    trained = {arm: surveys_read(configs[arm], mix_only=True) for arm in ev.arms}
    inside = [arm for arm, surveys in trained.items() if ev.held_out in surveys]
    if inside:
        raise ValueError(f"evaluation {name!r}: arms {inside} train on {ev.held_out}, its held-out survey")
    reads = sorted({*([ev.held_out] if ev.held_out else []), *ev.surveys})
    check_surveys(f"evaluation {name!r}", reads, shards, made)
    settings = {k: getattr(ev, k) for k in ("held_out", "surveys", "split", "bootstrap", "seed")}
    return Node(EVAL_PREFIX + name, "eval", ((DATA_NODE,) if made & set(reads) else ()) + tuple(ev.arms), {
        "kind": "eval", "name": name, "study": study.name, "dir": str(Path(out) / "eval" / name), "study_dir": out,
        "shards": shards, "arms": {arm: configs[arm]["out_dir"] for arm in ev.arms}, "training_surveys": trained,
        **settings, "pairs": ev.pairs, "curve": ev.curve, "reads": reads, "hashed": {**settings, "arms": ev.arms},
        "parents": {arm: export_dir(out, arm) for arm in ev.arms}})


def data_node(study: StudyConfig, out: str, shards: str) -> Node:
    data = to_dict(study.data)
    return Node(DATA_NODE, "data", (), {"kind": "data", "name": DATA_NODE, "study": study.name,
                                        "dir": str(Path(out) / "raw"), "shards": shards, "data": data,
                                        "makes": study.data.makes(), "hashed": data, "reads": [], "parents": {}})


def arm_order(study: StudyConfig) -> list[str]:
    """The arms in the YAML's order, each moved after the arm it starts from (the config loader refused cycles)."""
    order: list[str] = []

    def visit(name: str) -> None:
        parent = study.arms[name].init_from
        if parent and parent not in order:
            visit(parent)
        if name not in order:
            order.append(name)

    for name in study.arms:
        visit(name)
    return order


def resolve_arms(study: StudyConfig, out: str, shards: str) -> dict[str, dict]:
    """Every arm's resolved training config (`resolve_arm`), in `arm_order`."""
    configs: dict[str, dict] = {}
    for name in arm_order(study):
        configs[name] = resolve_arm(study, name, out, shards, configs)
    return configs


def export_dir(out: str, arm: str) -> str:
    return str(Path(out) / "arms" / arm / "export")


def resolve_arm(study: StudyConfig, name: str, out: str, shards: str, resolved: dict[str, dict]) -> dict:
    """The arm's whole training config (as a mapping): its YAML, the study's overrides, its own, then the run folder,
    the shard root and where it starts from. A supervised parent's export is loaded whole (init_from); an ssl parent
    exports a backbone (its teacher), which starts this arm's model (model_overrides pretrained=<export>/backbone),
    as does any parent of an ssl arm."""
    from train.config import load_train_config

    arm = study.arms[name]
    overrides = [*dotted_overrides(study.overrides), *dotted_overrides(arm.overrides),
                 f"out_dir={Path(out) / 'arms' / name}", f"data.loader.shard_root={shards}"]
    where = f"arm {name!r} ({arm.config})"
    try:
        cfg = load_train_config(arm.config, overrides)
        if arm.init_from:
            export = export_dir(out, arm.init_from)
            if "ssl" in (cfg.stage, resolved[arm.init_from]["stage"]):
                overrides.append(dotted_overrides({"model_overrides": [*cfg.model_overrides,
                                                                       f"pretrained={export}/backbone"]})[0])
            else:
                overrides.append(f"init_from={export}")
            cfg = load_train_config(arm.config, overrides)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return to_dict(cfg)


def _mix_surveys(mix: str) -> list[str]:
    return [part.split("=", 1)[0].strip() for part in mix.split(",") if part.strip()]


def surveys_read(config: dict, mix_only: bool = False) -> list[str]:
    """The surveys a resolved training config reads: its mix (every phase of a mix schedule, which replaces the mix),
    and unless `mix_only` its validation surveys and domain-adversarial targets."""
    data = config["data"]
    phases = data.get("mix_schedule") or [{"mix": data["mix"]}]
    surveys = [survey for phase in phases for survey in _mix_surveys(phase["mix"])]
    if not mix_only:
        surveys += list(data.get("val_surveys") or []) + list((config.get("dann") or {}).get("target_surveys") or [])
    return list(dict.fromkeys(surveys))


def check_surveys(what: str, surveys: list[str], shards: str, made: set[str]) -> None:
    missing = [s for s in surveys if s not in made and not (Path(shards) / s / "manifest.json").is_file()]
    if missing:
        raise ValueError(f"{what} reads {missing}, which {shards} does not hold (no <survey>/manifest.json) and the "
                         "study's `data:` section does not make: build them (python -m sharding.build), point --shards "
                         "at a root that has them, or add them to `data:`")


def parents_of(nodes: list[Node]) -> dict[str, tuple[str, ...]]:
    return {node.name: node.deps for node in nodes}


def dependants(nodes: list[Node], name: str) -> list[str]:
    """Every node that needs `name`, directly or through others, in plan order."""
    found: set[str] = {name}
    for node in nodes:
        if found & set(node.deps):
            found.add(node.name)
    return [node.name for node in nodes if node.name in found and node.name != name]
