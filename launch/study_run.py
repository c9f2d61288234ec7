"""Running study nodes: a training arm (`python -m train`, under torchrun for several processes), an evaluation
(`python -m eval` ood and metrics) and the data node (sharding.mock, derive and build); and the local executor,
which runs a plan one node at a time, skipping what is done and continuing what was interrupted."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from launch import study_state as st
from launch.slurm import torchrun_command
from launch.study_graph import Node, dependants

TRAIN_LOG = "study_train.log"


def train_command(spec: dict) -> list[str]:
    args = ["--config", str(Path(spec["dir"]) / st.CONFIG_FILE), "--resume", "auto"]
    if spec["nproc"] > 1:
        from train.world import free_port
        return torchrun_command(sys.executable, spec["nproc"], args, master_port=free_port())
    return [sys.executable, "-m", "train", *args]


def run_arm(spec: dict, log) -> None:
    """Train here; the run's own output goes to <arm>/study_train.log."""
    cmd = train_command(spec)
    path = Path(spec["dir"]) / TRAIN_LOG
    log(f"    {' '.join(cmd)}\n    log: {path}")
    with open(path, "a") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if code or not st.export_finished(Path(spec["dir"]) / "export"):
        tail = "".join(path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"training exited with code {code} before its export; the end of {path}:\n{tail}")


def _eval(argv: list[str], log_file: Path) -> None:
    """One `python -m eval` job in this process; its tables go to the evaluation's eval.log, errors to stderr."""
    from eval.__main__ import main as eval_main

    with open(log_file, "a") as out, contextlib.redirect_stdout(out):
        print(f"$ python -m eval {' '.join(argv)}", flush=True)
        code = eval_main(argv)
    if code:
        raise RuntimeError(f"python -m eval {' '.join(argv)} exited with code {code} (log {log_file})")


def run_evaluation(spec: dict, log) -> Path:
    """eval ood on the held-out survey (and eval metrics of each arm's held-out predictions, for the noise ceiling),
    and a matrix cell per arm and survey (eval predict's cached predictions, then eval metrics); result.json last."""
    from eval.predict import cached_prediction

    out, shards = Path(spec["dir"]), spec["shards"]
    common = ["--shards", shards, "--bootstrap", str(spec["bootstrap"]), "--seed", str(spec["seed"])]
    log_file = out / "eval.log"
    result = {k: spec[k] for k in ("name", "held_out", "surveys", "split", "arms", "training_surveys")}
    if spec["held_out"]:
        held = spec["held_out"]
        log(f"    eval ood: {', '.join(spec['arms'])} on every {held} galaxy and their own test splits")
        _eval(["ood", "--runs", *(f"{a}={d}" for a, d in spec["arms"].items()), "--held-out", held, "--out",
               str(out / "ood"), "--no-progress", *common], log_file)
        result["ood"] = str(out / "ood" / "ood.json")
        ood = json.loads(Path(result["ood"]).read_text())
        result["held_out_metrics"] = {}
        for arm in spec["arms"]:
            path = out / "metrics" / f"{arm}-{held}.json"
            _eval(["metrics", ood["runs"][arm]["preds"][held], "--json", str(path), *common], log_file)
            result["held_out_metrics"][arm] = str(path)
    if spec["surveys"]:
        log(f"    matrix: {len(spec['arms'])} arms x {len(spec['surveys'])} surveys ({spec['split']} splits)")
        result["matrix"] = {}
        for arm, run in spec["arms"].items():
            for survey in spec["surveys"]:
                preds = cached_prediction(run, shards, survey, spec["split"], out / "preds" / arm)
                path = out / "matrix" / f"{arm}-{survey}.json"
                _eval(["metrics", str(preds), "--json", str(path), *common], log_file)
                result["matrix"].setdefault(arm, {})[survey] = str(path)
    path = out / st.RESULT_FILE
    st.write_atomically(path, json.dumps(result, indent=2) + "\n")
    return path


def prepare_data(spec: dict, log) -> None:
    """Mock surveys (one sky, `seed`), built into the shard root; unlabeled copies under their own names; derived
    surveys (sharding.derive --build-to). Only what the shard root lacks is made."""
    from sharding import build, derive, mock
    from sharding.registry import load_survey

    data, raw, shards = spec["data"], Path(spec["dir"]), Path(spec["shards"])
    missing = [s for s in spec["makes"] if not (shards / s / "manifest.json").is_file()]
    derived = {name: name.split("_as_") for name in data["derived"]}
    sources = {**{s: s for s in data["surveys"]}, **data["unlabeled"], **{n: f for n, (f, _) in derived.items()}}
    size = ["--image-size", str(data["image_size"])] if data["image_size"] else []
    workers = ["--workers", str(data["workers"]), "--no-progress"]

    def call(main, argv: list[str], what: str) -> None:
        log(f"    {what}")
        if main(argv):
            raise RuntimeError(f"{what} failed")

    for survey in dict.fromkeys(sources[name] for name in missing):
        call(mock.main, ["--survey", survey, "--num-galaxies", str(data["num_galaxies"]), "--out", str(raw / survey),
                         "--seed", str(data["seed"]), "--corrupt-fraction", str(data["corrupt_fraction"]),
                         "--overwrite", *workers], f"mock {survey}: {data['num_galaxies']} galaxies -> {raw / survey}")
    for name in missing:
        source = raw / sources[name]
        catalog = source / Path(load_survey(sources[name]).catalog).name
        if name in derived:
            call(derive.main, ["--from", derived[name][0], "--like", derived[name][1], "--catalog", str(catalog),
                               "--images", str(source / "images"), "--out", str(raw / name), "--seed",
                               str(data["seed"]), "--overwrite", "--build-to", str(shards), *workers],
                 f"derive {name} -> {shards / name}")
            continue
        survey, flags = sources[name], []
        if name in data["unlabeled"]:
            survey, flags = str(_renamed_survey(sources[name], name, raw)), ["--unlabeled"]
        call(build.main, ["--survey", survey, "--catalog", str(catalog), "--images", str(source / "images"), "--out",
                          str(shards), *size, *flags, *workers], f"build {name} -> {shards / name}")


def _renamed_survey(source: str, name: str, raw: Path) -> Path:
    """The source survey's YAML under another name: the same images built again as another survey (unlabeled)."""
    import yaml

    from sharding.registry import survey_path

    data = yaml.safe_load(survey_path(source).read_text())
    data["name"] = name
    path = raw / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_node(spec: dict, log=print) -> None:
    """Stamp the node's folder (keep it when its inputs are unchanged, else empty it), then run it."""
    if spec["kind"] != "data":
        log(f"    {st.stamp(spec)}")
    if spec["kind"] == "arm":
        run_arm(spec, log)
    elif spec["kind"] == "eval":
        run_evaluation(spec, log)
    else:
        prepare_data(spec, log)


def run_local(nodes: list[Node], log=print) -> dict[str, str]:
    """Every node in plan order, one at a time. A node whose parents failed does not run (as SLURM's afterok);
    the others still do. Returns node -> "done", "ran", "failed" or "blocked"."""
    outcome: dict[str, str] = {}
    blocked: set[str] = set()
    for i, node in enumerate(nodes, 1):
        head = f"[{i}/{len(nodes)}] {node.label}"
        if blocked & set(node.deps):
            log(f"{head}: not run: it needs {', '.join(d for d in node.deps if d in blocked)}, which failed")
            outcome[node.name] = "blocked"
            blocked.add(node.name)
            continue
        done, why = st.state(node.spec, [d for d in node.deps if outcome.get(d) not in ("done", "ran")])
        if done:
            log(f"{head}: {why}, skipped")
            outcome[node.name] = "done"
            continue
        log(f"{head}: {why}")
        started = time.perf_counter()
        st.write_spec(node.spec)
        try:
            run_node(node.spec, log)
        except (RuntimeError, ValueError, OSError) as err:
            log(f"{head}: FAILED after {time.perf_counter() - started:.0f} s: {err}")
            later = dependants(nodes, node.name)
            if later:
                log(f"    will not run: {', '.join(later)}")
            outcome[node.name] = "failed"
            blocked.add(node.name)
            continue
        log(f"{head}: finished in {time.perf_counter() - started:.0f} s")
        outcome[node.name] = "ran"
    return outcome
