"""Evaluation metrics against independent sources: scipy, hand-computed values, simulations with known truth."""

import numpy as np
import pandas as pd
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
    # A galaxy whose noise cannot be estimated (one vote) makes the ceiling of that set undefined, not one of a subset.
    assert np.isnan(m.noise_ceiling_r(observed[:50], np.r_[1, votes[1:50]]))


def test_r_and_its_noise_ceiling_are_on_the_same_galaxies():
    """Galaxies whose question got fewer than 2 votes count neither for r nor for its ceiling."""
    from eval.labels import SurveyLabels, align
    from eval.score import score_survey

    rng = np.random.default_rng(4)
    n = 300
    true = rng.beta(2, 2, n)
    totals = np.where(np.arange(n) < 100, 1.0, rng.integers(5, 30, n).astype(float))
    fraction = rng.binomial(totals.astype(int), true) / totals
    labels = pd.DataFrame({"key": [f"s_{i}" for i in range(n)], "q_a": fraction, "q_a_votes": fraction * totals,
                           "q_total-votes": totals}).set_index("key")
    frame = pd.DataFrame({"key": labels.index, "survey": "s", "q_a": true + rng.normal(0, 0.05, n)})
    aligned = align(frame, ["q_a"], SurveyLabels("s", labels, {"q": ["q_a"]}))
    row = score_survey(aligned, frame, {"q": ["q_a"]}, [], bootstrap=0, seed=0)["features"]["q_a"]
    kept = totals >= 2
    assert row["n"] == kept.sum() == n - 100
    assert row["r"] == pytest.approx(stats.pearsonr(frame["q_a"][kept], fraction[kept])[0], abs=1e-12)
    f, t = fraction[kept], totals[kept]
    assert row["ceiling_r"] == pytest.approx(np.sqrt(1 - np.mean(f * (1 - f) / (t - 1)) / f.var()), abs=1e-12)


def test_eval_nll_is_the_training_loss_beyond_the_logit_clamp():
    """Logits past the clamp: eval's NLL is training's, scipy's on the clamped concentrations (not 35.87)."""
    from eval.nll import question_nll
    from models.config import load_model_config
    from models.head import LOGIT_BOUND, MorphologyModel
    from models.losses import dirichlet_multinomial_nll

    clamped = np.exp(np.clip([12.0, 0.0, -12.0], -LOGIT_BOUND, LOGIT_BOUND))
    expected = -stats.dirichlet_multinomial.logpmf([30, 5, 0], clamped, 35)
    got = question_nll(np.array([[12.0, 0.0, -12.0]]), None, np.array([[30.0, 5.0, 0.0]]), np.array([35.0]))[0]
    assert got == pytest.approx(expected, rel=1e-3) and expected == pytest.approx(32.53, abs=0.01)
    # Every question of the tiny model, logits well past the clamp, a survey lacking an answer, rest votes: equal.
    torch.manual_seed(0)
    layout = MorphologyModel(load_model_config("tiny")).layout
    raw = torch.randn(16, layout.num_outputs) * 12
    assert (raw.abs() > LOGIT_BOUND).float().mean() > 0.3
    rng = np.random.default_rng(0)
    votes = torch.tensor(rng.integers(0, 12, (16, layout.num_features)), dtype=torch.float32)
    present = torch.ones_like(votes, dtype=torch.bool)
    present[:5, 9] = False  # a survey without bulge-size_none: its votes join the rest bucket
    totals = (votes @ layout.feature_question) + 3  # 3 votes per question for answers outside the schema
    training = dirichlet_multinomial_nll(raw, votes=votes, feature_mask=present, total_votes=totals, layout=layout)
    for q, (name, sl) in enumerate(layout.question_slices()):
        column = layout.other_column(name)
        got = question_nll(raw[:, sl].numpy(), None if column is None else raw[:, column].numpy(),
                           np.where(present[:, sl], votes[:, sl], np.nan), totals[:, q].numpy())
        np.testing.assert_allclose(got, training[:, q].numpy(), rtol=1e-6, err_msg=name)


def test_confident_accuracy_by_hand():
    target = np.array([[0.9, 0.1], [0.85, 0.15], [0.2, 0.8], [0.05, 0.95], [np.nan, np.nan]])
    pred = np.array([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5], [0.1, 0.9], [0.9, 0.1]])
    accuracy, n = m.confident_accuracy(pred, target)
    assert n == 3  # row 2 is not confident (0.8 is not > 0.8), row 4 has no labels
    assert accuracy == pytest.approx(2 / 3)  # row 1 picks the wrong answer
    # An incomplete question: the implicit "other" share can win.
    accuracy, n = m.confident_accuracy(np.array([[0.3, 0.1]]), np.array([[0.9, 0.05]]))
    assert (accuracy, n) == (0.0, 1)


def _old_rule_coverage(k, total, p_samples, level):
    """The rule the calibration used to apply: the vote fraction inside mean +- z * (MC spread alone)."""
    z = stats.norm.ppf(0.5 + level / 2)
    return np.mean(np.abs(k / total - p_samples.mean(axis=0)) <= z * p_samples.std(axis=0))


def test_predictive_intervals_of_a_model_equal_to_the_truth_have_nominal_coverage():
    rng = np.random.default_rng(11)
    n = 20000
    true = rng.beta(2.0, 3.0, n)
    total = rng.integers(3, 40, n).astype(float)
    k = rng.binomial(total.astype(int), true).astype(float)
    below, at = m.binomial_mixture_cdf(k, total, true[None])  # a model that knows the true fractions, no spread
    tolerance = 3 * np.sqrt(0.25 / n) + 0.002
    for point in m.predictive_coverage(below, at):
        assert point["coverage"] == pytest.approx(point["nominal"], abs=tolerance)
    # Without the vote noise, even the truth looks over-confident: its spread is zero.
    assert _old_rule_coverage(k, total, np.repeat(true[None], 2, axis=0), 0.9) < 0.2


def test_predictive_coverage_with_a_known_model_spread():
    """Each galaxy's truth is a draw from the model's MC distribution: intervals of spread + vote noise are
    nominal, the MC spread alone under-covers."""
    rng = np.random.default_rng(12)
    n, num_samples = 6000, 200
    centre, concentration = rng.beta(2.0, 2.0, n), 40.0
    a, b = centre * concentration, (1 - centre) * concentration
    true = rng.beta(a, b)
    p_samples = rng.beta(a, b, (num_samples, n))
    total = rng.integers(5, 40, n).astype(float)
    k = rng.binomial(total.astype(int), true).astype(float)
    below, at = m.binomial_mixture_cdf(k, total, p_samples)
    tolerance = 3 * np.sqrt(0.25 / n) + 0.01  # + the MC approximation of the mixture with 200 samples
    curve = m.predictive_coverage(below, at)
    for point in curve:
        assert point["coverage"] == pytest.approx(point["nominal"], abs=tolerance)
    assert _old_rule_coverage(k, total, p_samples, 0.9) < 0.9 - 0.15


def test_dirichlet_multinomial_predictive_of_the_true_concentrations_is_nominal():
    rng = np.random.default_rng(13)
    n = 8000
    alpha = rng.uniform(0.5, 6.0, (n, 3))
    gammas = rng.gamma(alpha)
    fractions = gammas / gammas.sum(axis=1, keepdims=True)  # Dirichlet(alpha) draws
    total = rng.integers(5, 40, n)
    counts = rng.multinomial(total, fractions).astype(float)
    below, at = m.beta_binomial_mixture_cdf(counts, total[:, None].astype(float), alpha[None],
                                            alpha.sum(axis=1, keepdims=True)[None])
    tolerance = 3 * np.sqrt(0.25 / n) + 0.002
    for point in m.predictive_coverage(below, at):
        assert point["coverage"] == pytest.approx(point["nominal"], abs=tolerance)
    # The binomial of the mean fractions ignores the Dirichlet's spread: too narrow for this truth.
    mean_only = m.predictive_coverage(*m.binomial_mixture_cdf(counts, total[:, None].astype(float),
                                                              (alpha / alpha.sum(axis=1, keepdims=True))[None]))
    assert next(p["coverage"] for p in mean_only if p["nominal"] == 0.9) < 0.85


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


def test_paired_differences_average_only_the_features_both_models_define():
    rng = np.random.default_rng(10)
    target = rng.random((200, 3))
    a = target + rng.normal(0, 0.2, target.shape)
    b = target + rng.normal(0, 0.3, target.shape)
    a[:, 0] = 0.5  # a constant prediction: r undefined for model a on feature 0, defined for b
    mask = np.ones_like(target, bool)
    diff = m.paired_differences([a, b], target, mask, num_resamples=200)[(0, 1)]["r"]
    r = lambda p, j: stats.pearsonr(p[:, j], target[:, j])[0]  # noqa: E731
    assert diff["diff"] == pytest.approx(np.mean([r(a, 1) - r(b, 1), r(a, 2) - r(b, 2)]), abs=1e-12)
    assert diff["ci"][0] <= diff["diff"] <= diff["ci"][1]
