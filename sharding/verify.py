"""`python -m sharding.verify DIR`: check built shards against their manifest, labels and index files."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from sharding.sky import match_positions
from sharding.writer import index_name, index_text, sha256_of, tar_members


def _sample_keys(tar_path: Path) -> list[str]:
    keys: list[str] = []
    for name, _, _ in tar_members(tar_path):
        key = name[: name.find(".", name.rfind("/") + 1)]
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys


def _check_shard(survey_dir: Path, entry: dict, checksums: bool, problems: list[str]) -> list[str]:
    tar_path = survey_dir / entry["name"]
    if not tar_path.is_file():
        problems.append(f"{tar_path}: missing shard listed in manifest.json")
        return []
    size = tar_path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{tar_path}: {size} bytes, manifest says {entry['bytes']}")
    if checksums and sha256_of(tar_path) != entry["sha256"]:
        problems.append(f"{tar_path}: sha256 differs from manifest.json (corrupted or modified)")
    try:
        keys = _sample_keys(tar_path)
    except Exception as err:  # noqa: BLE001 - any tar error is a finding, not a crash
        problems.append(f"{tar_path}: unreadable tar ({err})")
        return []
    if len(keys) != entry["num_samples"]:
        problems.append(f"{tar_path}: {len(keys)} samples, manifest says {entry['num_samples']}")
    if len(set(keys)) != len(keys):
        problems.append(f"{tar_path}: a sample key appears in two non-adjacent places")
    idx_path = survey_dir / entry.get("index", index_name(entry["name"]))
    if not idx_path.is_file():
        problems.append(f"{idx_path}: missing index file")
    elif idx_path.read_text() != index_text(tar_path):
        problems.append(f"{idx_path}: does not agree with {tar_path.name} (offsets/sizes/members differ)")
    return keys


def verify_survey(survey_dir: Path, checksums: bool = True) -> list[str]:
    """Every problem found in one survey's build directory (empty when it is sound)."""
    problems: list[str] = []
    manifest_path = survey_dir / "manifest.json"
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing (not a built survey, or the build did not finish; re-run sharding.build)"]
    manifest = json.loads(manifest_path.read_text())
    tar_keys: dict[str, list[str]] = {}
    for entry in manifest["shards"]:
        tar_keys[entry["name"]] = _check_shard(survey_dir, entry, checksums, problems)
    listed = {e["name"] for e in manifest["shards"]}
    for extra in sorted(p.name for p in survey_dir.glob("*.tar") if p.name not in listed):
        problems.append(f"{survey_dir / extra}: shard not listed in manifest.json")
    labels_path = survey_dir / manifest.get("labels", "labels.parquet")
    if not labels_path.is_file():
        return problems + [f"{labels_path}: missing"]
    labels = pd.read_parquet(labels_path, columns=["key", "shard"])
    label_count = Counter(labels["key"])
    for key, n in label_count.items():
        if n > 1:
            problems.append(f"{labels_path}: key {key} has {n} label rows")
    label_shard = dict(zip(labels["key"], labels["shard"]))
    all_keys = Counter(k for keys in tar_keys.values() for k in keys)
    for shard, keys in tar_keys.items():
        for key in keys:
            if all_keys[key] > 1:
                problems.append(f"{survey_dir / shard}: key {key} also appears in another shard")
            if key not in label_shard:
                problems.append(f"{survey_dir / shard}: sample {key} has no row in {labels_path.name}")
            elif label_shard[key] != shard:
                problems.append(f"{labels_path.name}: {key} says shard {label_shard[key]}, found in {shard}")
    for key in sorted(set(label_shard) - set(all_keys)):
        problems.append(f"{labels_path.name}: row {key} has no sample in any shard")
    if len(labels) != manifest["num_samples"]:
        problems.append(f"{labels_path.name}: {len(labels)} rows, manifest says {manifest['num_samples']}")
    rejects_path = survey_dir / manifest.get("rejects", "rejects.parquet")
    if not rejects_path.is_file():
        problems.append(f"{rejects_path}: missing")
    return problems


def survey_dirs(path: Path) -> list[Path]:
    """A survey directory itself, or every survey directory under a shard root."""
    if (path / "manifest.json").is_file():
        return [path]
    return sorted(p.parent for p in path.glob("*/manifest.json"))


def twins_across(root: Path, radius_arcsec: float = 1.0) -> tuple[list[str], int]:
    """Report lines on cross-survey twins (one-to-one positional matches) under a shard root, and how many twins
    are in different splits in a survey pair where either survey was built with sky splits (a leak)."""
    tables, rules = {}, {}
    for survey_dir in survey_dirs(root):
        manifest = json.loads((survey_dir / "manifest.json").read_text())
        tables[survey_dir.name] = pd.read_parquet(survey_dir / manifest.get("labels", "labels.parquet"),
                                                  columns=["key", "ra", "dec", "split"])
        rules[survey_dir.name] = manifest.get("split_rule", {"split_by": "id"})
    names, lines, leaks = sorted(tables), [], 0
    described = {json.dumps(r, sort_keys=True) for r in rules.values()}
    if len(described) > 1:
        lines.append("warning: the surveys were split by different rules: " + "; ".join(
            f"{n}: {_rule_text(rules[n])}" for n in names))
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ta, tb = tables[a], tables[b]
            ia, ib, sep = match_positions(ta["ra"], ta["dec"], tb["ra"], tb["dec"], radius_arcsec)
            split_a, split_b = ta["split"].to_numpy()[ia], tb["split"].to_numpy()[ib]
            differ = np.flatnonzero(split_a != split_b)
            sky = "sky" in (rules[a]["split_by"], rules[b]["split_by"])
            leaks += len(differ) if sky else 0
            lines.append(f"{'FAIL' if sky and len(differ) else 'ok  '} {a} - {b}: {len(ia)} twins within "
                         f"{radius_arcsec:g} arcsec, {len(differ)} in different splits")
            for k in differ[:5]:
                lines.append(f"  - {ta['key'].iat[ia[k]]} ({split_a[k]}) and {tb['key'].iat[ib[k]]} ({split_b[k]}), "
                             f"{sep[k]:.2f} arcsec apart")
            if len(differ) and not sky:
                lines.append("    (split by object id: a galaxy's copies fall in splits independently; rebuild "
                             "with --split-by sky to keep twins together)")
    return lines, leaks


def _rule_text(rule: dict) -> str:
    if rule["split_by"] == "sky":
        return f"sky cells, HEALPix nside {rule['healpix_nside']}"
    return "object id"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sharding.verify",
        description="Verify built shards: checksums and sizes against manifest.json, sample counts, every tar "
                    "sample has exactly one labels.parquet row and vice versa, and DALI index files agree with "
                    "the tars. DIR is one survey's directory or a shard root holding several. With --across ROOT, "
                    "also match every pair of surveys under ROOT by position and report twins (the same galaxy "
                    "in two surveys) whose splits differ: exit 1 if a sky-split survey has any.",
        epilog="examples:\n  python -m sharding.verify data/shards\n"
               "  python -m sharding.verify --across data/shards --radius 1.0",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, nargs="?", help="e.g. data/shards/hst or data/shards")
    parser.add_argument("--no-checksums", action="store_true", help="skip sha256 (faster on large builds)")
    parser.add_argument("--across", type=Path, metavar="ROOT",
                        help="shard root whose surveys are cross-matched for twins in different splits")
    parser.add_argument("--radius", type=float, default=1.0, help="match radius in arcsec for --across")
    args = parser.parse_args(argv)
    if args.dir is None and args.across is None:
        parser.error("give DIR, --across ROOT, or both")
    failed = verify_dirs(args.dir, not args.no_checksums) if args.dir is not None else 0
    if failed < 0:
        return 2
    if args.across is not None:
        if len(survey_dirs(args.across)) < 2:
            print(f"error: --across {args.across}: needs a shard root with at least two built surveys",
                  file=sys.stderr)
            return 2
        try:
            lines, leaks = twins_across(args.across, args.radius)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print("\n".join(lines))
        failed += leaks > 0
    return 1 if failed else 0


def verify_dirs(path: Path, checksums: bool) -> int:
    """Verify every survey directory at or under path; the number that failed, or -1 when there are none."""
    dirs = survey_dirs(path)
    if not dirs:
        print(f"error: no manifest.json in {path} or its sub-directories", file=sys.stderr)
        return -1
    failed = 0
    for survey_dir in dirs:
        problems = verify_survey(survey_dir, checksums=checksums)
        if problems:
            failed += 1
            print(f"FAIL {survey_dir}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  - {problem}")
        else:
            manifest = json.loads((survey_dir / "manifest.json").read_text())
            print(f"ok   {survey_dir}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards")
    return failed


if __name__ == "__main__":
    sys.exit(main())
