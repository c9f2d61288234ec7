"""A study's study.json and report (report.md with PNGs beside it, report.html self-contained), assembled from the
JSON its evaluations wrote (eval ood's ood.json, eval metrics' files); no statistic is computed here. Figures come
from eval/plots.py."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

from launch import study_state as st
from launch.study_config import EVAL_PREFIX

INPUT_FILE = "study_input.json"  # the plan: name, source YAML, shard root, nodes (written by run and submit)
STUDY_FILE = "study.json"


def _load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def held_out_summary(spec: dict, result: dict) -> dict:
    """Per arm: ID and held-out r, the drop and the drop as a share of the held-out noise ceiling; the chosen paired
    differences; the progressive curve. From ood.json and the metrics of each arm's held-out predictions."""
    held, ood = spec["held_out"], _load(result["ood"])
    arms = {}
    for arm in spec["arms"]:
        run = ood["runs"][arm]
        ind, mean, drop = run["in_distribution"]["mean"], run["mean"], run["drop"]
        ceiling = _load(result["held_out_metrics"][arm])["surveys"][held]["mean"]["ceiling_r"]
        share = drop["r"] / ceiling if _finite(drop["r"]) and _finite(ceiling) and ceiling > 0 else None
        id_by_survey = {s: v["mean"]["r"] for s, v in run["in_distribution"]["surveys"].items()
                        if _finite(v.get("mean", {}).get("r"))}
        arms[arm] = {"training_surveys": run["training_surveys"], "id_r": ind["r"], "id_r_ci": ind["r_ci"],
                     "id_r_by_survey": id_by_survey,
                     "held_out_r": mean["r"], "held_out_r_ci": mean["r_ci"], "drop_r": drop["r"],
                     "drop_r_ci": drop["r_ci"], "held_out_ceiling_r": ceiling, "drop_share_of_ceiling": share,
                     "new_galaxies": run["subsets"]["new"], "export": run["export"]}
    return {"held_out": held, "n": ood["n"], "num_features": len(ood["features"]), "ood": result["ood"],
            "gain_plot": ood.get("gain_plot"), "arms": arms,
            "pairs": [pair(ood, a, b) for a, b in spec["pairs"]],
            "curve": [{"arm": a, **{k: arms[a][k] for k in ("training_surveys", "held_out_r", "held_out_r_ci",
                                                             "id_r", "id_r_ci")}} for a in spec["curve"]]}


def pair(ood: dict, a: str, b: str) -> dict:
    """a - b on the held-out galaxies, from eval ood's paired bootstrap (which lists each pair one way round)."""
    for p in ood["pairs"]:
        if {p["a"], p["b"]} == {a, b}:
            sign = 1 if p["a"] == a else -1
            r, new = p["r"], p["subsets"]["new"]
            return {"a": a, "b": b, "r_diff": sign * r["diff"], "ci": _signed(r["ci"], sign),
                    "p_gt0": r["p_gt0"] if sign > 0 else 1 - r["p_gt0"],
                    "new_galaxies": {"n": new["n"], "r_diff": None if new["diff"] is None else sign * new["diff"],
                                     "ci": None if new["ci"] is None else _signed(new["ci"], sign)}}
    raise ValueError(f"eval ood's {ood.get('held_out')} study has no pair {a} - {b}")


def _signed(ci: list[float], sign: int) -> list[float]:
    return list(ci) if sign > 0 else [-ci[1], -ci[0]]


def matrix_summary(spec: dict, result: dict) -> dict:
    rows = {}
    for arm, cells in result["matrix"].items():
        row = {}
        for survey, path in cells.items():
            res = _load(path)["surveys"].get(survey)
            row[survey] = ({"n": res["n"], "r": res["mean"]["r"], "r_ci": res["mean"]["r_ci"],
                            "ceiling_r": res["mean"].get("ceiling_r"), "metrics": path} if res else None)
        rows[arm] = {"training_surveys": spec["training_surveys"][arm], "cells": row}
    return {"split": spec["split"], "surveys": spec["surveys"], "rows": rows}


def summarize(out: Path) -> dict:
    plan = _load(out / INPUT_FILE)
    nodes, evaluations = [], {}
    for node in plan["nodes"]:
        folder = Path(node["dir"])
        spec = st.read_spec(folder) if (folder / st.NODE_FILE).is_file() else None
        record = st.read_record(folder)
        nodes.append({**node, "finished": bool(spec) and st.finished(spec),
                      "provenance": record.get("provenance") if record else None})
        if node["kind"] != "eval":
            continue
        result_file = folder / st.RESULT_FILE
        if spec is None or not result_file.is_file():
            evaluations[node["name"][len(EVAL_PREFIX):]] = {"finished": False}
            continue
        result = _load(result_file)
        summary = {"finished": True, "result": str(result_file)}
        if result.get("ood"):
            summary["held_out"] = held_out_summary(spec, result)
        if result.get("matrix"):
            summary["matrix"] = matrix_summary(spec, result)
        evaluations[spec["name"]] = summary
    add_ceiling_shares(evaluations)
    return {"study": plan["study"], "source": plan["source"], "out": plan["out"], "shards": plan["shards"],
            "nodes": nodes, "evaluations": evaluations}


TARGET_GAP = 0.15
"""The original plan's success metric: a held-out survey's r, as a share of its noise ceiling, within 15% of the
in-distribution share (1 - held-out share / ID share <= 0.15)."""


def add_ceiling_shares(evaluations: dict) -> None:
    """Each held-out arm's r as a share of the noise ceiling, held out and in distribution, and the gap between them.

    A test split's noise ceiling depends on its votes alone, so an ID survey's ceiling is read from any matrix
    cell of the same split; an arm with a training survey that no matrix scores gets no ID share (None)."""
    ceilings: dict[str, float] = {}
    for ev in evaluations.values():
        for row in ev.get("matrix", {}).get("rows", {}).values():
            for survey, cell in row["cells"].items():
                if cell and _finite(cell.get("ceiling_r")):
                    ceilings.setdefault(survey, cell["ceiling_r"])
    for ev in evaluations.values():
        for r in ev.get("held_out", {}).get("arms", {}).values():
            held = r["held_out_r"] / r["held_out_ceiling_r"] if _finite(r["held_out_ceiling_r"]) else None
            ids = r["id_r_by_survey"]
            known = ids and all(s in ceilings for s in ids)
            id_share = sum(v / ceilings[s] for s, v in ids.items()) / len(ids) if known else None
            gap = 1 - held / id_share if held is not None and id_share else None
            r.update({"held_out_share": held, "id_share": id_share, "share_gap": gap,
                      "meets_target": None if gap is None else gap <= TARGET_GAP})


def _cell(value, ci=None, signed: bool = False) -> str:
    if not _finite(value):
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(value)
    if ci and all(_finite(c) for c in ci):
        text += " [" + ", ".join(fmt.format(c) for c in ci) + "]"
    return text


def _figures(name: str, ev: dict, folder: Path) -> dict[str, Path]:
    from eval import plots

    made = {}
    if "matrix" in ev:
        m = ev["matrix"]
        arms = list(m["rows"])
        cells = [[m["rows"][a]["cells"].get(s) or {} for s in m["surveys"]] for a in arms]
        png = plots.heatmap([f"{a} ({'+'.join(m['rows'][a]['training_surveys'])})" for a in arms], m["surveys"],
                            [[c.get("r", math.nan) for c in row] for row in cells],
                            [[c.get("r_ci") for c in row] for row in cells],
                            f"domain shift: mean r on each survey's {m['split']} split [95% bootstrap]",
                            "test survey", "arm (trained on)")
        made["matrix"] = folder / f"{name}-matrix.png"
        st.write_atomically(made["matrix"], png)
    held = ev.get("held_out")
    if held and held["curve"]:
        points = held["curve"]
        png = plots.curve([f"{p['arm']}\n({'+'.join(p['training_surveys'])})" for p in points],
                          {f"held-out {held['held_out']}": ([p["held_out_r"] for p in points],
                                                            [p["held_out_r_ci"] for p in points]),
                           "in-distribution (test)": ([p["id_r"] for p in points], [p["id_r_ci"] for p in points])},
                          "progressive mix: mean r [95% bootstrap]")
        made["curve"] = folder / f"{name}-curve.png"
        st.write_atomically(made["curve"], png)
    if held and held.get("gain_plot") and Path(held["gain_plot"]).is_file():
        made["gain"] = Path(held["gain_plot"])
    return made


def blocks(study: dict, folder: Path) -> list[tuple]:
    """The report as ("h", text), ("p", text), ("table", header, rows) and ("img", path, alt) blocks."""
    out: list[tuple] = [("h1", f"Study {study['study']}"),
                        ("p", f"{study['source']}; shards {study['shards']}; folder {study['out']}.")]
    rows = [[n["name"], n["kind"], ", ".join(n["deps"]) or "-", "yes" if n["finished"] else "no",
             (n["provenance"] or "-")[:12]] for n in study["nodes"]]
    out.append(("table", ["node", "kind", "needs", "finished", "provenance"], rows))
    for name, ev in study["evaluations"].items():
        out.append(("h2", f"Evaluation {name}"))
        if not ev["finished"]:
            out.append(("p", "not finished yet."))
            continue
        figures = _figures(name, ev, folder)
        if "matrix" in ev:
            m = ev["matrix"]
            out.append(("p", f"Domain-shift matrix: mean Pearson r over the features on each survey's {m['split']} "
                             "split, 95% bootstrap interval over galaxies (eval metrics)."))
            out.append(("table", ["arm", "trained on", *m["surveys"]],
                        [[a, "+".join(r["training_surveys"]), *(_cell(c["r"], c["r_ci"]) if c else "-"
                                                                for c in (r["cells"].get(s) for s in m["surveys"]))]
                         for a, r in m["rows"].items()]))
            out.append(("img", figures["matrix"], "domain-shift heatmap"))
        if "held_out" in ev:
            out += _held_out_blocks(ev["held_out"], figures)
    return out


def _held_out_blocks(held: dict, figures: dict[str, Path]) -> list[tuple]:
    name = held["held_out"]
    out = [("p", f"Held out: every {name} galaxy ({held['n']}, {held['num_features']} features), which no arm trained "
                 f"on (eval ood). ID r: the mean over an arm's training surveys of each one's test-split r; drop: ID "
                 f"minus held-out r; share: the drop over the mean noise ceiling of r on the {name} galaxies (the "
                 "best r their finite votes allow).")]
    out.append(("table", ["arm", "trained on", "ID r", f"{name} r", "drop", "ceiling", "drop / ceiling",
                          "r on new galaxies"],
                [[a, "+".join(r["training_surveys"]), _cell(r["id_r"], r["id_r_ci"]),
                  _cell(r["held_out_r"], r["held_out_r_ci"]), _cell(r["drop_r"], r["drop_r_ci"]),
                  _cell(r["held_out_ceiling_r"]),
                  f"{r['drop_share_of_ceiling']:.0%}" if _finite(r["drop_share_of_ceiling"]) else "-",
                  f"{_cell(r['new_galaxies']['r'], r['new_galaxies']['r_ci'])} (n={r['new_galaxies']['n']})"]
                 for a, r in held["arms"].items()]))
    out.append(("p", f"The original plan's target: held-out {name} r as a share of its noise ceiling within "
                      f"{TARGET_GAP:.0%} of the in-distribution share (the mean over the training surveys of r over "
                      "each test split's ceiling, read from the matrix; '-' where a training survey has no matrix row)."))
    pct = lambda x: f"{x:.0%}" if _finite(x) else "-"  # noqa: E731
    out.append(("table", ["arm", f"{name} share", "ID share", "gap", f"within {TARGET_GAP:.0%}"],
                [[a, pct(r.get("held_out_share")), pct(r.get("id_share")), pct(r.get("share_gap")),
                  {True: "yes", False: "no"}.get(r.get("meets_target"), "-")] for a, r in held["arms"].items()]))
    if held["pairs"]:
        out.append(("p", f"Paired differences on the same {name} galaxies (eval ood's paired bootstrap)."))
        out.append(("table", ["a - b", "r difference", "P(> 0)", "on new galaxies"],
                    [[f"{p['a']} - {p['b']}", _cell(p["r_diff"], p["ci"], signed=True), f"{p['p_gt0']:.2f}",
                      f"{_cell(p['new_galaxies']['r_diff'], p['new_galaxies']['ci'], signed=True)} "
                      f"(n={p['new_galaxies']['n']})"] for p in held["pairs"]]))
    if "curve" in figures:
        out.append(("img", figures["curve"], "progressive curve"))
    if "gain" in figures:
        out.append(("img", figures["gain"], "per-question gain on the held-out survey"))
    return out


def to_markdown(items: list[tuple], folder: Path) -> str:
    lines = []
    for item in items:
        if item[0] in ("h1", "h2"):
            lines += ["#" * int(item[0][1]) + " " + item[1], ""]
        elif item[0] == "p":
            lines += [item[1], ""]
        elif item[0] == "table":
            lines += ["| " + " | ".join(item[1]) + " |", "|" + "---|" * len(item[1])]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in item[2]] + [""]
        else:
            lines += [f"![{item[2]}]({os.path.relpath(Path(item[1]).resolve(), folder.resolve())})", ""]
    return "\n".join(lines)


def to_html(items: list[tuple], title: str) -> str:
    from eval.report import STYLE

    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{STYLE}</style>"]
    for item in items:
        if item[0] in ("h1", "h2"):
            parts.append(f"<{item[0]}>{html.escape(item[1])}</{item[0]}>")
        elif item[0] == "p":
            parts.append(f"<p>{html.escape(item[1])}</p>")
        elif item[0] == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in item[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                           for row in item[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        else:
            data = base64.b64encode(Path(item[1]).read_bytes()).decode()
            parts.append(f'<p><img alt="{html.escape(item[2])}" src="data:image/png;base64,{data}"></p>')
    return "\n".join(parts) + "\n"


def write_report(out: Path) -> Path:
    """study.json, report.md (figures in <out>/report/) and report.html from what has finished so far."""
    out = Path(out)
    study = summarize(out)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    items = blocks(study, folder)
    study["report"] = {"markdown": str(out / "report.md"), "html": str(out / "report.html"),
                       "figures": [str(item[1]) for item in items if item[0] == "img"]}
    st.write_atomically(out / "report.md", to_markdown(items, out))
    st.write_atomically(out / "report.html", to_html(items, f"study {study['study']}"))
    st.write_atomically(out / STUDY_FILE, json.dumps(study, indent=2) + "\n")
    return out / STUDY_FILE
