"""Every evaluation figure (the only module importing matplotlib): each function returns PNG bytes."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # headless: figures are files and data URIs, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 110
COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _errors(values: list[float], cis: list[list[float]]) -> np.ndarray:
    lo = [v - c[0] if np.isfinite(v) and np.isfinite(c[0]) else 0.0 for v, c in zip(values, cis)]
    hi = [c[1] - v if np.isfinite(v) and np.isfinite(c[1]) else 0.0 for v, c in zip(values, cis)]
    return np.array([lo, hi])


def feature_bars(surveys: dict[str, dict]) -> bytes:
    """Per-feature Pearson r with 95% intervals, one bar per survey, and each feature's noise ceiling as a tick."""
    names = list(dict.fromkeys(n for res in surveys.values() for n, row in res["features"].items() if row["n"]))
    fig, ax = plt.subplots(figsize=(max(8, 0.42 * len(names) * max(1, len(surveys)) ** 0.5), 4.2))
    width = 0.8 / max(len(surveys), 1)
    x = np.arange(len(names))
    for i, (survey, res) in enumerate(surveys.items()):
        rows = [res["features"].get(n, {"r": math.nan, "r_ci": [math.nan] * 2, "ceiling_r": math.nan}) for n in names]
        r = [row["r"] for row in rows]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, np.nan_to_num(r), width, yerr=_errors(r, [row["r_ci"] for row in rows]), capsize=1.5,
               color=COLOURS[i % len(COLOURS)], label=survey, error_kw={"lw": 0.7})
        ax.scatter(pos, [row.get("ceiling_r", math.nan) for row in rows], marker="_", s=60, color="k", zorder=3,
                   label="noise ceiling" if i == 0 else None)
    ax.set_xticks(x, names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("Pearson r")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_ylim(min(-0.2, ax.get_ylim()[0]), 1.0)
    ax.legend(fontsize=7, ncols=min(5, len(surveys) + 1))
    ax.set_title("r per feature (bars: 95% bootstrap interval; ticks: noise ceiling)", fontsize=9)
    return _png(fig)


def agreement_bars(survey_pairs: dict[str, dict]) -> bytes:
    """Cross-survey agreement per feature, one panel per survey pair: r between the model's predictions for the two
    copies of each galaxy next to r between the two surveys' volunteer fractions, with 95% intervals."""
    num_features = max((len(p["features"]) for p in survey_pairs.values()), default=1)
    panels = max(len(survey_pairs), 1)
    fig, axes = plt.subplots(panels, 1, squeeze=False, figsize=(max(8, 0.42 * num_features), 3.6 * panels))
    for ax, (label, res) in zip(axes[:, 0], survey_pairs.items()):
        names = list(res["features"])
        x = np.arange(len(names))
        for i, side in enumerate(("model", "volunteers")):
            rows = [res["features"][n][side] for n in names]
            r = [row["r"] for row in rows]
            ax.bar(x - 0.2 + 0.4 * i, np.nan_to_num(r), 0.4, yerr=_errors(r, [row["r_ci"] for row in rows]),
                   capsize=1.5, color=COLOURS[i], label=side, error_kw={"lw": 0.7})
        ax.set_xticks(x, names, rotation=75, ha="right", fontsize=7)
        ax.set_ylabel("Pearson r")
        ax.axhline(0, color="0.6", lw=0.6)
        ax.set_ylim(min(-0.2, ax.get_ylim()[0]), 1.0)
        ax.legend(fontsize=7)
        ax.set_title(f"{label}: the same galaxy in both surveys (bars: 95% bootstrap interval over pairs)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def hexbins(panels: list[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    """Predicted vs volunteer fraction, one hexbin panel per question (its answers pooled)."""
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (title, true, pred) in zip(axes.flat, panels):
        ok = np.isfinite(true) & np.isfinite(pred)
        ax.hexbin(true[ok], pred[ok], gridsize=18, extent=(0, 1, 0, 1), mincnt=1, cmap="viridis", bins="log")
        ax.plot([0, 1], [0, 1], color="w", lw=0.8, ls="--")
        # No r in the title: a question's answers pooled correlate by construction (fractions sum to 1).
        ax.set_title(f"{title} ({int(ok.sum())} answers)", fontsize=8)
        ax.set_xlabel("volunteer fraction", fontsize=7)
        ax.set_ylabel("predicted", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def calibration(curves: dict[str, list[dict]]) -> bytes:
    """Predictive-interval coverage (MC-dropout spread plus vote noise) against the nominal level, one line per
    survey."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=0.8, label="perfect")
    for i, (name, points) in enumerate(curves.items()):
        ax.plot([p["nominal"] for p in points], [p["coverage"] for p in points], "o-", color=COLOURS[i % 10],
                label=name)
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("observed coverage")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("predictive calibration (MC spread + vote noise)", fontsize=9)
    return _png(fig)


def robustness_curves(kinds: dict[str, list[dict]], metric: str = "r") -> bytes:
    """Mean metric (with interval) and mean prediction shift against perturbation strength, one panel per kind."""
    fig, axes = plt.subplots(2, len(kinds), figsize=(3.3 * len(kinds), 5.2), squeeze=False)
    for col, (kind, points) in enumerate(kinds.items()):
        labels = [str(p["strength"]) for p in points]
        values = [p[metric] for p in points]
        x = np.arange(len(points))
        axes[0, col].errorbar(x, values, yerr=_errors(values, [p.get(f"{metric}_ci", [math.nan] * 2) for p in points]),
                              fmt="o-", capsize=2)
        axes[0, col].set_title(kind, fontsize=9)
        axes[0, col].set_ylabel(f"mean {metric}" if col == 0 else "")
        axes[1, col].plot(x, [p["shift"] for p in points], "s-", color=COLOURS[1])
        axes[1, col].set_ylabel("mean |prediction shift|" if col == 0 else "")
        for ax in axes[:, col]:
            ax.set_xticks(x, labels, fontsize=7, rotation=30)
    fig.tight_layout()
    return _png(fig)


def gain_plot(questions: list[str], gains: dict[str, tuple[list[float], list[list[float]]]], title: str) -> bytes:
    """Per-question difference in mean r on the held-out survey (one series per pair), with 95% intervals."""
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(questions)), 3.8))
    x = np.arange(len(questions))
    width = 0.8 / max(len(gains), 1)
    for i, (name, (values, cis)) in enumerate(gains.items()):
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(values), width, yerr=_errors(values, cis), capsize=2,
               color=COLOURS[i % 10], label=name)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_xticks(x, questions, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("difference in mean r")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def contact_sheet(images: list[np.ndarray], titles: list[str], columns: int = 6) -> bytes:
    """Labelled thumbnails (uint8 (H, W, 3) each) in a grid."""
    rows = max(1, math.ceil(len(images) / columns))
    cols = min(columns, max(len(images), 1))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=6)
    fig.tight_layout()
    return _png(fig)


def heatmap(rows: list[str], columns: list[str], values: np.ndarray, cis: list[list[list[float] | None]],
            title: str, xlabel: str, ylabel: str) -> bytes:
    """A matrix of mean r (rows x columns), each cell annotated with its value and 95% interval; NaN cells blank."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.5 * len(columns) + 2.6, 0.62 * len(rows) + 1.9))
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=min(low, 0.0), vmax=max(high, 0.05),
                      aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if not np.isfinite(values[i, j]):
                continue
            ci = cis[i][j]
            text = f"{values[i, j]:.2f}" + (f"\n[{ci[0]:.2f}, {ci[1]:.2f}]" if ci and all(np.isfinite(ci)) else "")
            bright = image.norm(values[i, j]) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="k" if bright else "w")
    ax.set_xticks(np.arange(len(columns)), columns, fontsize=8)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03).set_label("mean r", fontsize=8)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def curve(labels: list[str], series: dict[str, tuple[list[float], list[list[float]]]], title: str,
          ylabel: str = "mean r") -> bytes:
    """Values with 95% intervals along an ordered list (e.g. arms adding a survey each), one line per series."""
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(labels) + 1.5), 3.6))
    x = np.arange(len(labels))
    for i, (name, (values, cis)) in enumerate(series.items()):
        ax.errorbar(x + 0.04 * (i - (len(series) - 1) / 2), values, yerr=_errors(values, cis), fmt="o-", capsize=3,
                    color=COLOURS[i % 10], label=name)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def labels_curve(series: dict[str, tuple[list[float], list[float], list[list[float]]]],
                 reference: tuple[float, list[float]], reference_label: str, title: str,
                 ylabel: str = "mean r") -> bytes:
    """Active learning: the metric against labels used, one line per strategy (x, values, 95% intervals), and a
    shaded band for the reference (e.g. random selection with every label)."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    value, (lo, hi) = reference
    ax.axhline(value, color="0.3", lw=1, ls="--", label=reference_label)
    ax.axhspan(lo, hi, color="0.85", zorder=0)
    for i, (name, (x, values, cis)) in enumerate(series.items()):
        shift = 1.0 + 0.012 * (i - (len(series) - 1) / 2)  # side by side on a log axis
        ax.errorbar(np.asarray(x, float) * shift, values, yerr=_errors(values, cis), fmt="o-", capsize=3,
                    color=COLOURS[i % 10], label=name)
    ax.set_xscale("log")
    ticks = sorted({int(v) for x, _, _ in series.values() for v in x})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labelled galaxies")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _png(fig)
