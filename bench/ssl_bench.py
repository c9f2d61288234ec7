"""Benchmark: what self-supervised pretraining (stage ssl, configs/train/ssl_cpu.yaml) is worth (issue 17).

On mock SDSS, DECaLS, HST and UKIDSS surveys (launch.demo's, plus an unlabeled build of UKIDSS) it runs:
1. two SSL pretrainings of the recipe: on sdss+decals+hst+unlabeled ukidss images ("ssl") and on sdss+decals+hst only
   ("ssl_no_ukidss");
2. frozen features: a ridge probe (per survey, fitted on its train split; DINOv2's linear-probe input from the last
   1 or 4 blocks and alpha chosen on val), a head stage (configs/train/cpu.yaml, stage head) and an MLP head stage
   on the SSL teacher against the same on a randomly initialised backbone;
3. scarce labels: full fine-tuning (configs/train/cpu.yaml) from the SSL teacher (with the recipe's lr; with lr 1e-3
   + layer decay 0.75, "ld"; a head stage first, then "ld", "lpft") against from scratch, with 10% and 100% of the
   training labels (data.label_fraction);
4. adaptation: the two SSL backbones each fine-tuned on the 33/33/34 mix with all labels, scored on every UKIDSS
   galaxy (which no fine-tuning saw);
5. the recipe without its brightness and contrast jitter ("nojitter"): its frozen probe against the recipe's, and its
   10%-label fine-tunings;
6. optionally, longer SSL (--long-ssl-steps, e.g. 2,000), SSL on more unlabeled images (--more-unlabeled, e.g.
   6,000 more galaxies per survey from another mock sky, none of them labelled) and any other overrides of the recipe
   (--variant): each one's frozen probe and 10%-label fine-tunings.
Mean Pearson r over the 26 features on the test split (every galaxy for UKIDSS), 95% bootstrap intervals over
galaxies, paired comparisons (the same resamples for both arms). Runs are kept under --out: a re-run makes the mock
shards again and skips the runs done on the same shards (bench.kept). Prints tables, writes JSON. (Not bench/ssl.py:
a bench script puts bench/ on sys.path, where a module named ssl would shadow Python's own.)

    python bench/ssl_bench.py --out runs/bench_ssl                      # 1,500 galaxies per survey; ~1 hour
    python bench/ssl_bench.py --out runs/bench_ssl_s2 --seed 2 --targets   # the two targets on a new sky; ~20 min
    python bench/ssl_bench.py --out runs/bench_ssl_s3 --seed 3 --targets --variant 'viewpx KEY=VALUE ...'
        # and another arm's SSL and head-first 10%, judged by bench/ssl_skies.py --recipe viewpx
    python bench/ssl_bench.py --out runs/bench_ssl_w3 --seed 3 --targets --backbone hidden_size=96 \
        --backbone num_attention_heads=3     # the same with a wider cpu model in every run (one --out per backbone)
    python bench/ssl_bench.py --out /tmp/s --num-galaxies 300 --ssl-steps 60 --ft-steps 60 --head-steps 60 \
        --mlp-head-steps 60  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.kept import kept, record_run  # noqa: E402
from bench.probes import CPU, model_predictions, print_rows, ridge_predictions, score  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.ssl_data import HELD_OUT, make_data, more_images, random_backbone  # noqa: E402
from bench.ssl_targets import LABELLED, TARGET_PAIRS, TARGET_RUNS, target_arms, target_runs  # noqa: E402

MIX = "sdss=0.33,decals=0.33,hst=0.34"
SSL = str(REPO / "configs" / "train" / "ssl_cpu.yaml")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    return env


def with_backbone(overrides: list[str], backbone: list[str]) -> list[str]:
    """`overrides` with the --backbone settings (`backbone.KEY=VALUE` model overrides) added to its
    model_overrides, so that every run - SSL, fine-tuning from it, scratch - builds the same backbone."""
    if not backbone:
        return list(overrides)
    out = [o for o in overrides if not o.startswith("model_overrides=")]
    given = [o.removeprefix("model_overrides=[").removesuffix("]")
             for o in overrides if o.startswith("model_overrides=")]
    return [*out, f"model_overrides=[{','.join([*filter(None, given), *backbone])}]"]


def check_backbone(args: argparse.Namespace) -> None:
    """An --out keeps the runs of one backbone: a re-run with other --backbone settings would reuse runs of the
    other model, so it stops."""
    record = args.out / "backbone.json"
    if record.is_file() and json.loads(record.read_text()) != args.backbone:
        raise ValueError(f"{args.out} holds runs of backbone settings {json.loads(record.read_text())}, not "
                         f"{args.backbone}: use another --out for another backbone")
    args.out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(args.backbone) + "\n")


def train(name: str, config: str, overrides: list[str], args: argparse.Namespace) -> Path:
    """One `python -m train` under torchrun; kept when its export exists (a re-run skips it)."""
    from launch.study_state import export_finished
    from train.world import free_port
    settings = [f"seed={args.seed}", f"checkpoint_every={10 ** 9}", *with_backbone(overrides, args.backbone)]
    out = args.out / "runs" / name
    if kept(out, export_finished(out / "export"), args.shards_fingerprint, args.shards_built_at):
        check_recipe(out, config, settings)
        return out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "train", "--config", config, "--out-dir", str(out),
           "--resume", "auto", *settings]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    (out / "stdout.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "stdout.txt").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise RuntimeError(f"{name} failed (log: {out / 'stdout.txt'}):\n{result.stderr[-3000:]}")
    record_run(out, args.shards_fingerprint)
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def check_recipe(out: Path, config: str, settings: list[str]) -> None:
    """A kept run is reused only when its resolved config is the one this command would train with."""
    from sharding.config import to_dict
    from train.checkpoint import identity_differences
    from train.config import load_train_config
    wanted = to_dict(load_train_config(config, [*settings, f"out_dir={out}"]))
    try:
        changed = identity_differences(to_dict(load_train_config(out / "config.yaml")), wanted)
    except ValueError as err:
        changed = [f"its config no longer loads ({err})"]
    if changed:
        raise ValueError(f"{out} was trained with another config than the benchmark's now ({'; '.join(changed[:4])}):"
                         " its numbers are the old recipe's. Move the benchmark's runs/ folder aside (or pass another "
                         "--out) and run again.")


# The MLP head stage: the head configs/models/base.yaml gives the ViT-B model (two hidden layers), on the frozen
# backbone with every label of the mix. The cpu model's linear head is ~0.1 mean r weaker than it on SSL features
# (sky 1's val split: linear 0.26 / 0.31 / 0.30 after 600 or 2,000 steps, MLP 0.40 / 0.43 / 0.42; docs/BENCHMARKS.md).
MLP_HEAD = ["stage=head", "optim.lr=0.003", f"data.mix={MIX}"]
MLP_HIDDEN = "head.hidden_sizes=[512,256]"


def mlp_head(name: str, backbone: Path, shards: Path, args: argparse.Namespace) -> Path:
    """The MLP head stage on a frozen backbone folder, as run mlp_head_<name>."""
    return train(f"mlp_head_{name}", CPU, [*MLP_HEAD, f"max_steps={args.mlp_head_steps}",
                                            f"data.loader.shard_root={shards}",
                                            f'model_overrides=["pretrained={backbone}", "{MLP_HIDDEN}"]'], args)


def frozen(args: argparse.Namespace, shards: Path, backbones: dict[str, Path]) -> list[dict]:
    """Ridge probe, head stage and MLP head stage on each backbone, per labelled survey."""
    heads = {f"head {name}": train(f"head_{name}", CPU, ["stage=head", f"max_steps={args.head_steps}",
                                                          f"data.mix={MIX}", f"data.loader.shard_root={shards}",
                                                          "optim.lr=0.01", f"model_overrides=[pretrained={folder}]"],
                                   args)
             for name, folder in backbones.items()}
    heads.update({f"mlp {name}": mlp_head(name, folder, shards, args) for name, folder in backbones.items()})
    rows = []
    for survey in LABELLED:
        probes = {f"ridge {name}": ridge_predictions(folder, shards, survey) for name, folder in backbones.items()}
        arms = {name: (keys, pred) for name, (keys, pred, _) in probes.items()}
        arms.update({name: model_predictions(run, shards, survey, "test") for name, run in heads.items()})
        pairs = [(f"{probe} ssl", f"{probe} random") for probe in ("ridge", "head", "mlp")]
        row = score(arms, shards, survey, "test", pairs, args)
        rows.append({**row, "probe_choice": {name: choice for name, (_, _, choice) in probes.items()}})
    return rows


# A fine-tuning recipe for pretrained weights: a lower lr and layer-wise decay keep the early blocks near the SSL ones.
PRETRAINED_FT = ["optim.lr=0.001", "optim.layer_decay=0.75"]


def _data(fraction: float, shards: Path) -> list[str]:
    return [f"data.mix={MIX}", f"data.loader.shard_root={shards}", f"data.label_fraction={fraction}",
            # Longer epochs (same steps): 10% of a survey's labels still fills a global batch.
            "data.epoch_multiplier=30"]


def fine_tune(name: str, fraction: float, backbone: Path | None, shards: Path, args: argparse.Namespace,
              extra: tuple[str, ...] = ()) -> Path:
    overrides = [*extra, f"max_steps={args.ft_steps}", *_data(fraction, shards)]
    if backbone is not None:
        overrides.append(f"model_overrides=[pretrained={backbone}]")
    return train(name, CPU, overrides, args)


def head_first(name: str, fraction: float, backbone: Path, shards: Path, args: argparse.Namespace) -> Path:
    """LP-FT (Kumar et al. 2022): a head stage on the frozen SSL backbone, then the full stage from it (init_from)
    with PRETRAINED_FT, so a random head's first gradients do not distort the pretrained features."""
    head = train(f"{name}_head", CPU, ["stage=head", f"max_steps={args.head_steps}", "optim.lr=0.01",
                                       *_data(fraction, shards), f"model_overrides=[pretrained={backbone}]"], args)
    return fine_tune(name, fraction, backbone, shards, args, (*PRETRAINED_FT, f"init_from={head / 'export'}"))


def scarce(args: argparse.Namespace, shards: Path, ssl_backbone: Path) -> tuple[list[dict], dict[str, Path]]:
    runs = {}
    for fraction in (0.1, 1.0):
        tag = f"{round(fraction * 100)}pct"
        runs[f"ssl {tag}"] = fine_tune(f"ft_ssl_{tag}", fraction, ssl_backbone, shards, args)
        runs[f"ssl ld {tag}"] = fine_tune(f"ft_ssl_{tag}_ld", fraction, ssl_backbone, shards, args,
                                          tuple(PRETRAINED_FT))
        runs[f"ssl lpft {tag}"] = head_first(f"ft_ssl_{tag}_lpft", fraction, ssl_backbone, shards, args)
        runs[f"scratch {tag}"] = fine_tune(f"ft_scratch_{tag}", fraction, None, shards, args)
    rows = []
    for survey in LABELLED:
        arms = {name: model_predictions(run, shards, survey, "test") for name, run in runs.items()}
        rows.append(score(arms, shards, survey, "test", [
            (f"ssl{variant} {tag}", f"scratch {tag}") for tag in ("10pct", "100pct") for variant in ("", " ld", " lpft")
        ], args))
    return rows, runs


def targets(args: argparse.Namespace, shards: Path, backbones: dict[str, Path], ssl_data: list[str]) -> dict:
    """The two targets' arms for the recipe and for each --variant (its SSL, MLP head stage and head-first 10%: the
    arms another recipe would be judged by, e.g. bench/ssl_skies.py --recipe NAME), scored on the test split."""
    for name, folder in backbones.items():
        mlp_head(name, folder, shards, args)
    head_first(TARGET_RUNS["ssl lpft 10pct"], 0.1, backbones["ssl"], shards, args)
    fine_tune(TARGET_RUNS["scratch 10pct"], 0.1, None, shards, args)

    def judged(recipe: str) -> list[dict]:
        return [score(target_arms(args.out, survey, target_runs(recipe)), shards, survey, "test", TARGET_PAIRS, args)
                for survey in LABELLED]
    result = {"targets": judged("ssl")}
    for name, overrides in args.variant:
        backbone = train(f"ssl_{name}", SSL, [*ssl_data, *overrides], args) / "export" / "backbone"
        mlp_head(name, backbone, shards, args)
        head_first(f"ft_{name}_10pct_lpft", 0.1, backbone, shards, args)
        result[f"targets {name}"] = judged(name)
    return result


def adaptation(args: argparse.Namespace, shards: Path, with_ukidss: Path, without: Path) -> dict:
    arms = {"ssl with ukidss images": with_ukidss,
            "ssl without ukidss": fine_tune("ft_ssl_no_ukidss_100pct", 1.0, without, shards, args)}
    predictions = {name: model_predictions(run, shards, HELD_OUT, "all") for name, run in arms.items()}
    return score(predictions, shards, HELD_OUT, "all", [("ssl with ukidss images", "ssl without ukidss")], args)


def variant(args: argparse.Namespace, shards: Path, name: str, overrides: list[str]) -> list[dict]:
    """Another SSL run ("ssl_<name>": the recipe with `overrides`), its frozen ridge probe against the recipe's, and
    its 10%-label fine-tunings (plain, ld, lpft) against scratch (the scarce arms' run, reused)."""
    backbone = train(f"ssl_{name}", SSL, overrides, args) / "export" / "backbone"
    tunes = {f"{name} 10pct": fine_tune(f"ft_{name}_10pct", 0.1, backbone, shards, args),
             f"{name} ld 10pct": fine_tune(f"ft_{name}_10pct_ld", 0.1, backbone, shards, args, tuple(PRETRAINED_FT)),
             f"{name} lpft 10pct": head_first(f"ft_{name}_10pct_lpft", 0.1, backbone, shards, args),
             "scratch 10pct": args.out / "runs" / "ft_scratch_10pct"}
    rows = []
    for survey in LABELLED:
        probes = {f"ridge {name}": ridge_predictions(backbone, shards, survey),
                  "ridge ssl": ridge_predictions(args.out / "runs" / "ssl" / "export" / "backbone", shards, survey)}
        arms = {arm: (keys, pred) for arm, (keys, pred, _) in probes.items()}
        arms.update({arm: model_predictions(r, shards, survey, "test") for arm, r in tunes.items()})
        pairs = [(f"ridge {name}", "ridge ssl"), *((f"{name}{v} 10pct", "scratch 10pct") for v in ("", " ld", " lpft"))]
        row = score(arms, shards, survey, "test", pairs, args)
        rows.append({**row, "probe_choice": {arm: choice for arm, (_, _, choice) in probes.items()}})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_ssl")
    parser.add_argument("--num-galaxies", type=int, default=1500, help="per mock survey")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes per run")
    parser.add_argument("--ssl-steps", type=int, help="SSL steps (default: ssl_cpu.yaml's max_steps)")
    parser.add_argument("--ft-steps", type=int, default=1000, help="fine-tuning steps (cpu.yaml recipe)")
    parser.add_argument("--long-ssl-steps", type=int, default=0,
                        help="also run the SSL recipe this long: its frozen probe, 10%%-label fine-tunings (0 skips)")
    parser.add_argument("--more-unlabeled", type=int, default=0,
                        help="also run the SSL recipe on this many more unlabeled galaxies of each survey, from "
                             "another mock sky: its frozen probe, 10%%-label fine-tunings (0 skips)")
    parser.add_argument("--variant", action="append", default=[], metavar="'NAME KEY=VALUE ...'",
                        help="also run the SSL recipe with these train overrides as arm NAME (repeatable): its frozen "
                             "probe, 10%%-label fine-tunings, e.g. --variant 'bright "
                             "data.loader.views.global_crops.contrast=0.0 data.loader.views.local_crops.contrast=0.0'")
    parser.add_argument("--targets", action="store_true",
                        help="only the two targets' arms, fixed in advance (the recipe's SSL, ridge probes and MLP "
                             "head stages of it and of a random backbone, head-first and scratch fine-tuning with 10%% "
                             "of the labels; ~20 min): a confirmatory run on a new sky (--seed); bench/ssl_skies.py "
                             "pools skies. With --variant, also each variant's SSL, MLP head stage and head-first 10%% "
                             "(~17 min each)")
    parser.add_argument("--backbone", action="append", default=[], metavar="KEY=VALUE",
                        help="a cpu-model backbone setting for every run of this --out (SSL, fine-tuning, scratch, "
                             "the random backbone), e.g. --backbone hidden_size=96 --backbone num_attention_heads=3 "
                             "(repeatable; one --out per backbone)")
    parser.add_argument("--head-steps", type=int, default=600, help="head-stage steps on a frozen backbone")
    parser.add_argument("--mlp-head-steps", type=int, default=2000, help="MLP head-stage steps on a frozen backbone")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "ssl.json")
    args = parser.parse_args(argv)
    args.variant = [_variant(parser, text) for text in args.variant]
    bad = [kv for kv in args.backbone if "=" not in kv or not kv.split("=", 1)[0].isidentifier()]
    if bad:
        parser.error(f"--backbone {bad[0]!r}: give KEY=VALUE with a backbone field of configs/models/cpu.yaml, "
                     "e.g. hidden_size=96")
    args.backbone = [f"backbone.{kv}" for kv in args.backbone]
    return args


def _variant(parser: argparse.ArgumentParser, text: str) -> tuple[str, list[str]]:
    name, *overrides = text.split()
    reserved = {"ssl", "random", "no_ukidss", "nojitter", "long", "more"}
    if not name.isidentifier() or name in reserved or not overrides or not all("=" in o for o in overrides):
        parser.error(f"--variant {text!r}: give a new arm name (a plain identifier, not one of {sorted(reserved)}) "
                     "and then one or more KEY=VALUE train overrides, separated by spaces")
    return name, overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    torch.set_num_threads(2)
    check_backbone(args)
    shards, ssl_root = make_data(args)
    ssl_steps = [f"max_steps={args.ssl_steps}"] if args.ssl_steps else []
    four = ",".join(f"{s}=0.25" for s in (*LABELLED, HELD_OUT))
    ssl_data = [f"data.loader.shard_root={ssl_root}", f"data.mix={four}", *ssl_steps]
    ssl = train("ssl", SSL, ssl_data, args)
    backbones = {"ssl": ssl / "export" / "backbone", "random": random_backbone(args)}
    if args.targets:
        result = targets(args, shards, backbones, ssl_data)
        for key, rows in result.items():
            print_rows(f"the two targets{key.removeprefix('targets')} (arms fixed in advance): mean r, test", rows)
        write_report(args.json, "ssl", [], **result, settings={k: str(v) for k, v in vars(args).items()})
        return 0
    ssl_without = train("ssl_no_ukidss", SSL, [f"data.loader.shard_root={shards}", f"data.mix={MIX}", *ssl_steps],
                        args)
    result = {"frozen": frozen(args, shards, backbones)}
    result["scarce"], runs = scarce(args, shards, backbones["ssl"])
    result["adaptation"] = adaptation(args, shards, runs["ssl 100pct"], ssl_without / "export" / "backbone")
    no_jitter = [f"data.loader.views.{crops}.{knob}=0.0" for crops in ("global_crops", "local_crops")
                 for knob in ("brightness", "contrast")]
    result["nojitter"] = variant(args, shards, "nojitter", [*ssl_data, *no_jitter])
    if args.long_ssl_steps:
        result["longer"] = variant(args, shards, "long", [*ssl_data, f"max_steps={args.long_ssl_steps}"])
    if args.more_unlabeled:
        result["more"] = variant(args, shards, "more", [f"data.loader.shard_root={more_images(args)}",
                                                        f"data.mix={four}", *ssl_steps])
    for name, overrides in args.variant:
        result[f"variant {name}"] = variant(args, shards, name, [*ssl_data, *overrides])
    print_rows("frozen features: mean r on the test split", result["frozen"])
    print_rows("scarce labels: full fine-tuning, mean r on the test split", result["scarce"])
    print_rows("adaptation: fine-tuned on the 33/33/34 mix, every UKIDSS galaxy", [result["adaptation"]])
    print_rows("without brightness and contrast jitter: frozen and 10% of the labels, test split", result["nojitter"])
    if args.long_ssl_steps:
        print_rows(f"longer SSL ({args.long_ssl_steps} steps): frozen and 10% of the labels, test split",
                   result["longer"])
    if args.more_unlabeled:
        print_rows(f"SSL on {args.more_unlabeled} more unlabeled galaxies per survey: frozen and 10% of the labels",
                   result["more"])
    for name, overrides in args.variant:
        print_rows(f"variant {name} ({' '.join(overrides)}): frozen and 10% of the labels", result[f"variant {name}"])
    write_report(args.json, "ssl", [], **result, settings={k: str(v) for k, v in vars(args).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
