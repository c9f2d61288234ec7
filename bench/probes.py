"""The SSL benchmark's measurements: frozen-feature ridge probes, a run's predictions, paired bootstrap scores.

Shared by bench/ssl_bench.py, bench/photometry_probe.py and bench/active.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.learning import bootstrap_weights, interval, weighted_mean_r

REPO = Path(__file__).resolve().parents[1]
CPU = str(REPO / "configs" / "train" / "cpu.yaml")


def labels(shards: Path, survey: str, split: str) -> tuple[list[str], np.ndarray]:
    """(keys, (n, 26) fractions with NaN where absent) of a split ("all": every row) from labels.parquet."""
    from sharding.schema import load_schema
    table = pd.read_parquet(shards / survey / "labels.parquet")
    if split != "all":
        table = table[table["split"] == split]
    return table["key"].tolist(), table[load_schema().names].to_numpy(np.float32)


# DINOv2's linear evaluation (dinov2/eval/linear.py, create_linear_input) feeds its probe the class tokens of the
# last n blocks (each through the final norm), concatenated, plus the mean of the last block's patch tokens, and picks
# n in {1, 4} on validation: n = 1 is the backbone's own cls_mean pooling.
N_LAST_BLOCKS = (1, 4)


def eval_input(shards: Path):
    """The evaluation input path's loader config (cpu.yaml's size, mean and std) on a shard root."""
    from loaders.source import LoaderConfig
    from train.config import load_train_config
    loader = load_train_config(CPU).data.loader
    return LoaderConfig(shard_root=str(shards), backend="torch", image_size=loader.image_size, mean=loader.mean,
                        std=loader.std)


@functools.cache  # the ridge and the MLP probe read the same features
@torch.no_grad()
def features(backbone_dir: Path, shards: Path, survey: str, split: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """{"last n blocks": DINOv2 linear-probe features} of a backbone folder on a split, through the evaluation input
    path."""
    from transformers import Dinov2Model

    from loaders.evaluation import iter_eval_batches
    model = Dinov2Model.from_pretrained(backbone_dir, local_files_only=True).eval()
    keys, out = [], {n: [] for n in N_LAST_BLOCKS}
    for batch in iter_eval_batches(eval_input(shards), survey, split, batch_size=128, max_samples=None):
        hidden = model(pixel_values=batch.images, output_hidden_states=True).hidden_states
        blocks = [model.layernorm(h) for h in hidden[-max(N_LAST_BLOCKS):]]
        for n in N_LAST_BLOCKS:
            out[n].append(torch.cat([*(h[:, 0] for h in blocks[-n:]), blocks[-1][:, 1:].mean(dim=1)], 1).numpy())
        keys += batch.keys
    return keys, {f"last {n} block(s)": np.concatenate(parts) for n, parts in out.items()}


def ridge(train_x: np.ndarray, train_y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature ridge regression on standardised inputs, each feature on the rows that have its label."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = (train_x - mean) / std
    x1 = np.hstack([x, np.ones((len(x), 1))])
    weights = np.zeros((x1.shape[1], train_y.shape[1]))
    for j in range(train_y.shape[1]):
        rows = np.isfinite(train_y[:, j])
        if rows.sum() < 3:
            continue
        a = x1[rows].T @ x1[rows] + alpha * np.diag([1.0] * x.shape[1] + [0.0])
        weights[:, j] = np.linalg.solve(a, x1[rows].T @ train_y[rows, j])
    return np.vstack([weights[:-1] / std[:, None], weights[-1:] - (mean / std) @ weights[:-1]]), mean


def _fitted(split_features, shards: Path, survey: str) -> dict:
    """{split: (keys, {option: features}, (n, 26) labels in the features' order)} for train, val and test."""
    fitted = {}
    for split in ("train", "val", "test"):
        keys, x = split_features(split)
        label_keys, y = labels(shards, survey, split)
        order = {k: i for i, k in enumerate(label_keys)}
        fitted[split] = (keys, x, y[[order[k] for k in keys]])
    return fitted


def _mean_r(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean r over the features of predictions against labels with NaN where absent (how val picks a probe)."""
    return float(weighted_mean_r(pred, np.nan_to_num(target), np.isfinite(target), np.ones((1, len(target))))[0])


def ridge_probe(split_features, shards: Path, survey: str) -> tuple[list[str], np.ndarray, dict]:
    """Test-split predictions of a ridge probe fitted on the train split, with the input (one of the options
    `split_features(split) -> (keys, {option: features})` gives) and alpha chosen by val mean r; and the choice."""
    fitted, best = _fitted(split_features, shards, survey), None
    for option in fitted["train"][1]:
        for alpha in (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0):
            w, _ = ridge(fitted["train"][1][option], fitted["train"][2], alpha)
            _, x, y = fitted["val"]
            pred = np.hstack([x[option], np.ones((len(y), 1))]) @ w
            r = _mean_r(pred, y)
            if best is None or r > best[0]:
                best = (r, w, {"input": option, "alpha": alpha, "val_r": r})
    keys, x, _ = fitted["test"]
    return keys, np.hstack([x[best[2]["input"]], np.ones((len(keys), 1))]) @ best[1], best[2]


def mlp_probe(split_features, shards: Path, survey: str, seed: int = 0, max_epochs: int = 300,
              hidden: tuple[int, ...] = (512, 256)) -> tuple[list[str], np.ndarray, dict]:
    """ridge_probe's nonlinear twin: an MLP (the base model's head widths, GELU, AdamW lr 1e-3, weight decay 0.05,
    batch 64, masked MSE on the labelled fractions) on standardised inputs, with the input option and the epoch
    (checked every 5) chosen by val mean r; test-split predictions at that choice."""
    keys, preds, choice = joint_mlp_probe({survey: split_features}, shards, seed, max_epochs, hidden)
    return keys[survey], preds[survey], choice


def joint_mlp_probe(features_of: dict, shards: Path, seed: int = 0, max_epochs: int = 300,
                    hidden: tuple[int, ...] = (512, 256)) -> tuple[dict, dict, dict]:
    """mlp_probe fitted on several surveys' train splits at once ({survey: split_features}), as a head stage on a mix
    reads a backbone: one MLP, inputs standardised over the pooled train split, input and epoch chosen by the mean
    over surveys of each one's val mean r. ({survey: test keys}, {survey: test predictions}, the choice)."""
    fitted = {survey: _fitted(split_features, shards, survey) for survey, split_features in features_of.items()}
    surveys, best = list(fitted), None
    counts = {split: np.cumsum([0, *(len(fitted[s][split][0]) for s in surveys)]) for split in ("val", "test")}
    for option in fitted[surveys[0]]["train"][1]:
        torch.manual_seed(seed)
        pooled = {split: (np.concatenate([fitted[s][split][1][option] for s in surveys]),
                          np.concatenate([fitted[s][split][2] for s in surveys])) for split in ("train", "val", "test")}
        mean, std = pooled["train"][0].mean(0), pooled["train"][0].std(0) + 1e-6
        x = {split: torch.tensor((v[0] - mean) / std, dtype=torch.float32) for split, v in pooled.items()}
        y = torch.tensor(np.nan_to_num(pooled["train"][1]), dtype=torch.float32)
        mask = torch.tensor(np.isfinite(pooled["train"][1]), dtype=torch.float32)
        layers, width = [], x["train"].shape[1]
        for size in hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.GELU()]
            width = size
        net = torch.nn.Sequential(*layers, torch.nn.Linear(width, y.shape[1]))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
        for epoch in range(1, max_epochs + 1):
            for rows in torch.randperm(len(x["train"])).split(64):
                m = mask[rows]
                loss = (((net(x["train"][rows]) - y[rows]) ** 2) * m).sum() / m.sum().clamp(min=1)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if epoch % 5:
                continue
            with torch.no_grad():
                val, cut = net(x["val"]).numpy(), counts["val"]
                r = float(np.mean([_mean_r(val[cut[i]:cut[i + 1]], fitted[s]["val"][2]) for i, s in enumerate(surveys)]))
                if best is None or r > best[0]:
                    best = (r, net(x["test"]).numpy(), {"input": option, "epoch": epoch, "val_r": r})
    cut = counts["test"]
    return ({s: fitted[s]["test"][0] for s in surveys},
            {s: best[1][cut[i]:cut[i + 1]] for i, s in enumerate(surveys)}, best[2])


@functools.cache  # the recipe's teacher is probed again beside every variant
def ridge_predictions(backbone_dir: Path, shards: Path, survey: str) -> tuple[list[str], np.ndarray, dict]:
    """ridge_probe on a backbone folder's DINOv2 linear-probe features (the last 1 or 4 blocks)."""
    return ridge_probe(lambda split: features(backbone_dir, shards, survey, split), shards, survey)


@torch.no_grad()
def model_predictions(run: Path, shards: Path, survey: str, split: str,
                      model: torch.nn.Module | None = None) -> tuple[list[str], np.ndarray]:
    """A training run's predictions on a split, with its loader's evaluation input; of its export, or of `model`
    (the run's model with other weights, e.g. an earlier checkpoint's)."""
    from loaders.evaluation import iter_eval_batches
    from models.io import load_export
    from train.config import load_train_config
    cfg = dataclasses.replace(load_train_config(run / "config.yaml").data.loader, shard_root=str(shards))
    model = (model if model is not None else load_export(run / "export")).eval()
    keys, preds = [], []
    for part in ("train", "val", "test") if split == "all" else (split,):
        for batch in iter_eval_batches(cfg, survey, part, batch_size=128, max_samples=None):
            preds.append(model.fractions(model(batch.images)).numpy())
            keys += batch.keys
    return keys, np.concatenate(preds)


def score(arms: dict[str, tuple[list[str], np.ndarray]], shards: Path, survey: str, split: str,
          pairs: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    """Mean r of each arm on one survey split, and paired differences, on the same bootstrap resamples."""
    num, resampled = resample(arms, shards, survey, split, args.bootstrap, args.seed)
    return summarise(resampled, pairs, {"survey": survey, "split": split, "n": num})


def resample(arms: dict[str, tuple[list[str], np.ndarray]], shards: Path, survey: str, split: str, num_resamples: int,
             seed: int) -> tuple[int, dict[str, np.ndarray]]:
    """(galaxies, {arm: (1 + B,) mean r}): each arm on the split itself (row 0), then on the same B resamples."""
    keys, target = labels(shards, survey, split)
    weights = bootstrap_weights(len(keys), num_resamples, seed)
    mask, resampled = np.isfinite(target), {}
    for name, (arm_keys, pred) in arms.items():
        order = {k: i for i, k in enumerate(arm_keys)}
        missing = [k for k in keys if k not in order]
        if missing:
            raise RuntimeError(f"{name} has no prediction for {len(missing)} {survey} {split} galaxies")
        resampled[name] = weighted_mean_r(pred[[order[k] for k in keys]], np.nan_to_num(target), mask, weights)
    return len(keys), resampled


def summarise(resampled: dict[str, np.ndarray], pairs: list[tuple[str, str]], row: dict) -> dict:
    """`row` with each arm's interval and the paired differences' (the same resamples for both arms)."""
    out = {**row, "arms": {name: interval(values) for name, values in resampled.items()}, "pairs": []}
    for a, b in pairs:
        diff = resampled[a] - resampled[b]
        out["pairs"].append({"a": a, "b": b, **interval(diff), "p_gt0": float((diff[1:] > 0).mean())})
    return out


def sky_rows(skies: list[tuple[int, Path, dict]], survey: str, pairs: list[tuple[str, str]],
             num_resamples: int) -> list[dict]:
    """One survey's rows over mock skies given as (seed, shards, arms): each sky bootstrapped over its own test
    galaxies with its seed, then, with several, the mean of the skies' resamples (a stratified bootstrap over skies
    that are independent draws of the mock)."""
    rows, values, total = [], [], 0
    for seed, shards, arms in skies:
        num, resampled = resample(arms, shards, survey, "test", num_resamples, seed)
        values.append(resampled)
        total += num
        rows.append({**summarise(resampled, pairs, {"survey": survey, "split": f"test, sky {seed}", "n": num}),
                     "sky": seed})
    if len(skies) > 1:
        mean = {arm: np.mean([sky[arm] for sky in values], axis=0) for arm in values[0]}
        split = f"test, mean of skies {[seed for seed, _, _ in skies]}"
        rows.append({**summarise(mean, pairs, {"survey": survey, "split": split, "n": total}), "sky": "pooled"})
    return rows


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    for row in rows:
        cells = "  ".join(f"{name} {v['r']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for name, v in row["arms"].items())
        print(f"  {row['survey']} {row['split']} (n={row['n']}): {cells}")
        for name, c in row.get("probe_choice", {}).items():
            print(f"    {name}: {c['input']}, alpha {c['alpha']:g} (val r {c['val_r']:.3f})")
        for p in row["pairs"]:
            print(f"    {p['a']} - {p['b']}: {p['r']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}] (P(> 0) = {p['p_gt0']:.2f})")
