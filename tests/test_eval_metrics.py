"""Evaluation metrics against independent sources: scipy, hand-computed values, simulations with known truth."""

import numpy as np
import pytest
import torch
from scipy import stats

from eval import metrics as m


def _data(seed=0, n=400, num_features=4):
    rng = np.random.default_rng(seed)
    target = rng.random((n, num_features))
    pred = 0.6 * target + 0.4 * rng.random((n, num_features))
    pred[:, 1] = np.round(pred[:, 1], 1)  # ties in the predictions
    target[:, 2] = np.round(target[:, 2], 1)  # ties in the labels
    mask = rng.random((n, num_features)) > 0.15
    return pred, target, mask


def test_point_metrics_match_scipy_and_hand_computed_values():
    pred, target, mask = _data()
    table = m.feature_table(pred, target, mask, list("abcd"), num_resamples=0)
    for j, name in enumerate("abcd"):
        p, t = pred[mask[:, j], j], target[mask[:, j], j]
        row = table["features"][name]
        assert row["n"] == mask[:, j].sum()
        assert row["r"] == pytest.approx(stats.pearsonr(p, t)[0], abs=1e-12)
        assert row["spearman"] == pytest.approx(stats.spearmanr(p, t)[0], abs=1e-12)
        assert row["mae"] == pytest.approx(np.mean(np.abs(p - t)), abs=1e-12)
        assert row["mse"] == pytest.approx(np.mean((p - t) ** 2), abs=1e-12)
        assert row["r2"] == pytest.approx(1 - np.sum((p - t) ** 2) / np.sum((t - t.mean()) ** 2), abs=1e-12)
    tiny = m.feature_table(np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [1.0], [4.0]]),
                           np.ones((3, 1), bool), ["x"], num_resamples=0)["features"]["x"]
    assert tiny["mae"] == pytest.approx(2 / 3) and tiny["mse"] == pytest.approx(4 / 3)
    assert tiny["r2"] == pytest.approx(1 - 12 / 26)  # SSE 4; SST = (25 + 4 + 49) / 9 = 26 / 3


def test_a_resample_equals_scipy_on_the_explicitly_resampled_galaxies():
    pred, target, mask = _data(seed=1)
    weights = next(m.bootstrap_weights(len(pred), 5, seed=3))
    assert weights.sum(axis=1).tolist() == [len(pred)] * 5
    arrays = m.metric_arrays(weights, pred, target, mask)
    for b in range(5):
        rows = np.repeat(np.arange(len(pred)), weights[b].astype(int))
        for j in range(pred.shape[1]):
            keep = mask[rows, j]
            p, t = pred[rows, j][keep], target[rows, j][keep]
            assert arrays["r"][b, j] == pytest.approx(stats.pearsonr(p, t)[0], abs=1e-10)
            assert arrays["spearman"][b, j] == pytest.approx(stats.spearmanr(p, t)[0], abs=1e-10)


def test_undefined_correlations_are_nan_not_errors():
    pred = np.array([[0.5, 0.1], [0.5, 0.2], [0.5, 0.3], [0.5, 0.4]])
    target = np.array([[0.1, 0.4], [0.2, 0.3], [0.3, 0.2], [0.4, np.nan]])
    table = m.feature_table(pred, target, np.isfinite(target), ["const", "short"], num_resamples=50)
    assert np.isnan(table["features"]["const"]["r"])  # a constant prediction has no correlation
    assert table["features"]["short"]["r"] == pytest.approx(-1.0)
    assert np.isnan(table["features"]["const"]["r_ci"]).all()


def test_bootstrap_interval_covers_the_true_correlation_at_about_the_nominal_rate():
    rho, n, trials = 0.5, 150, 120
    cov = [[1, rho], [rho, 1]]
    covered = 0
    for trial in range(trials):
        xy = np.random.default_rng(100 + trial).multivariate_normal([0, 0], cov, size=n)
        table = m.feature_table(xy[:, :1], xy[:, 1:], np.ones((n, 1), bool), ["x"], num_resamples=400,
                                seed=trial, metrics=("r",))
        lo, hi = table["features"]["x"]["r_ci"]
        covered += lo <= rho <= hi
    # Percentile intervals of r undercover slightly at this n; 95% nominal, binomial sd over 120 trials ~2%.
    assert 0.86 <= covered / trials <= 0.99


def test_noise_ceiling_matches_a_simulation_with_known_true_fractions():
    rng = np.random.default_rng(7)
    n = 20000
    true = rng.beta(2.0, 3.0, n)
    votes = rng.poisson(12, n) + 2
    observed = rng.binomial(votes, true) / votes
    simulated = np.corrcoef(true, observed)[0, 1]  # what a perfect model reaches against these labels
    assert m.noise_ceiling_r(observed, votes) == pytest.approx(simulated, abs=0.01)
    many_votes = rng.binomial(10000, true) / 10000
    assert m.noise_ceiling_r(many_votes, np.full(n, 10000)) > 0.999
    assert np.isnan(m.noise_ceiling_r(np.full(10, 0.3), np.full(10, 20)))


def test_dirichlet_multinomial_nll_matches_scipy():
    rng = np.random.default_rng(2)
    alpha = rng.uniform(0.2, 8.0, (30, 4))
    counts = rng.integers(0, 15, (30, 4)).astype(float)
    expected = [-stats.dirichlet_multinomial.logpmf(c, a, int(c.sum())) for c, a in zip(counts, alpha)]
    assert np.allclose(m.dirichlet_multinomial_nll(counts, alpha), expected, rtol=1e-10)


def test_question_nll_from_a_prediction_file_equals_the_training_loss():
    """Fractions + total concentration (what predict writes) give back the NLL the model was trained on."""
    from eval.infer import question_concentration
    from models.config import load_model_config
    from models.head import MorphologyModel, fractions
    from models.losses import dirichlet_multinomial_nll

    torch.manual_seed(0)
    model = MorphologyModel(load_model_config("tiny"))
    layout = model.layout
    raw = torch.randn(16, layout.num_outputs, dtype=torch.float64) * 2
    rng = np.random.default_rng(0)
    votes = torch.tensor(rng.integers(0, 12, (16, layout.num_features)), dtype=torch.float64)
    present = torch.ones_like(votes, dtype=torch.bool)
    present[:5, 9] = False  # a survey without bulge-size_none: its votes join the rest bucket
    totals = (votes @ layout.feature_question.double()) + 3  # 3 votes per question for answers outside the schema
    expected = dirichlet_multinomial_nll(raw, votes=votes, feature_mask=present, total_votes=totals, layout=layout)
    frac = fractions(raw, layout).numpy()
    conc = question_concentration(raw, model).numpy()
    for q, (name, sl) in enumerate(layout.question_slices()):
        got = m.question_nll(frac[:, sl], conc[:, q], np.where(present[:, sl], votes[:, sl], np.nan),
                             totals[:, q].numpy(), has_other=name in layout.other_questions)
        assert np.allclose(got, expected[:, q].numpy(), rtol=1e-4, atol=1e-4), name


def test_confident_accuracy_by_hand():
    target = np.array([[0.9, 0.1], [0.85, 0.15], [0.2, 0.8], [0.05, 0.95], [np.nan, np.nan]])
    pred = np.array([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5], [0.1, 0.9], [0.9, 0.1]])
    accuracy, n = m.confident_accuracy(pred, target)
    assert n == 3  # row 2 is not confident (0.8 is not > 0.8), row 4 has no labels
    assert accuracy == pytest.approx(2 / 3)  # row 1 picks the wrong answer
    # An incomplete question: the implicit "other" share can win.
    accuracy, n = m.confident_accuracy(np.array([[0.3, 0.1]]), np.array([[0.9, 0.05]]))
    assert (accuracy, n) == (0.0, 1)


def test_coverage_curve_is_nominal_for_calibrated_gaussian_errors():
    rng = np.random.default_rng(5)
    std = rng.uniform(0.02, 0.2, (20000, 1))
    target = rng.random((20000, 1))
    mean = target + rng.normal(0, std)
    for point in m.coverage_curve(mean, std, target, np.ones_like(target, bool)):
        assert point["coverage"] == pytest.approx(point["nominal"], abs=0.015)


def test_paired_differences_find_the_better_model_and_not_a_copy():
    rng = np.random.default_rng(9)
    target = rng.random((300, 3))
    good = target + rng.normal(0, 0.1, target.shape)
    bad = target + rng.normal(0, 0.4, target.shape)
    mask = np.ones_like(target, bool)
    diffs = m.paired_differences([good, bad, good.copy()], target, mask, num_resamples=300, groups={"first": [0]})
    better = diffs[(0, 1)]
    assert better["r"]["diff"] > 0 and better["r"]["ci"][0] > 0 and better["r"]["p_gt0"] == 1.0
    assert better["mae"]["diff"] < 0 and better["mae"]["ci"][1] < 0
    assert better["groups"]["first"]["r"]["ci"][0] > 0
    same = diffs[(0, 2)]
    assert same["r"]["diff"] == 0 and same["r"]["ci"] == [0.0, 0.0]
