"""Active-learning selection: BALD, MC variance, k-center greedy and the streamed top candidates, each checked
against an independent computation (hand-made arrays, brute force)."""

import itertools
import math
import tracemalloc

import numpy as np
import pytest

from eval.select import TopCandidates, ask_probabilities, bald_per_question, bald_scores, covering_radius, \
    k_center_greedy, mc_variance_scores, question_columns, question_parents, quota_counts, random_scores
from sharding.schema import Feature, FeatureSchema, Question, load_schema

# A two-question tree: "shape" (round, disk) at the root; "bar" (yes, no) asked only after shape = disk.
TOY = FeatureSchema("toy", 1, [Question("shape", [Feature("shape_round", "round"), Feature("shape_disk", "disk")]),
                               Question("bar", [Feature("bar_yes", "yes"), Feature("bar_no", "no")])])
TOY_PARENTS = {"shape": None, "bar": "shape_disk"}
COLUMNS = question_columns(TOY, ())
SURE, BIG = 1e-6, 1e6  # concentrations of an answer that is (almost) never / always chosen


def _alpha(*rows):
    """(S, 1, 4) concentrations from one row of 4 per MC sample."""
    return np.asarray(rows, np.float64)[:, None, :]


def test_a_certain_model_scores_zero():
    same = _alpha(*[[2.0, 8.0, 3.0, 1.0]] * 5)
    assert bald_scores(same, COLUMNS, TOY, TOY_PARENTS) == pytest.approx([0.0], abs=1e-12)
    assert mc_variance_scores(same[..., :4] / 10, TOY, TOY_PARENTS) == pytest.approx([0.0], abs=1e-12)


def test_two_confident_disagreeing_samples_score_log_2_per_binary_question():
    # Shape certain (disk), bar: one pass says yes, the other no, both confidently.
    alpha = _alpha([SURE, BIG, BIG, SURE], [SURE, BIG, SURE, BIG])
    per_question = bald_per_question(alpha, COLUMNS)
    assert per_question[0] == pytest.approx([0.0, math.log(2)], abs=1e-5)
    assert bald_scores(alpha, COLUMNS, TOY, TOY_PARENTS) == pytest.approx([math.log(2)], abs=1e-5)
    # Both questions in dispute: bar is asked with the mean chance of disk, 1/2.
    both = _alpha([SURE, BIG, BIG, SURE], [BIG, SURE, SURE, BIG])
    assert bald_scores(both, COLUMNS, TOY, TOY_PARENTS) == pytest.approx([1.5 * math.log(2)], abs=1e-5)


def test_a_question_behind_a_zero_probability_answer_contributes_nothing():
    # Every galaxy is round, so bar is never asked, however uncertain the model is about it.
    alpha = _alpha([BIG, SURE * 0, BIG, SURE], [BIG, SURE * 0, SURE, BIG]) + np.array([0, 1e-300, 0, 0])
    assert bald_per_question(alpha, COLUMNS)[0, 1] == pytest.approx(math.log(2), abs=1e-5)
    assert bald_scores(alpha, COLUMNS, TOY, TOY_PARENTS) == pytest.approx([0.0], abs=1e-9)
    fractions = np.array([[0.3, 0.7, 0.5, 0.5], [1.0, 0.0, 0.5, 0.5]])
    np.testing.assert_allclose(ask_probabilities(fractions, TOY, TOY_PARENTS), [[1.0, 0.7], [1.0, 0.0]])
    # MC variance: bar's fractions vary, but bar is behind shape_disk = 0.
    samples = np.array([[[1.0, 0.0, 0.9, 0.1]], [[1.0, 0.0, 0.1, 0.9]]])
    assert mc_variance_scores(samples, TOY, TOY_PARENTS) == pytest.approx([0.0])
    samples[:, :, :2] = [0.0, 1.0]  # now always disk: the variance of bar (0.16 per answer) counts fully
    assert mc_variance_scores(samples, TOY, TOY_PARENTS) == pytest.approx([0.32])


def test_bald_matches_a_direct_computation_on_the_standard_schema():
    schema = load_schema()
    others = ("bulge-size",)
    columns = question_columns(schema, others)
    parents = question_parents(schema, "decals")
    assert parents["bar"] == "disk-edge-on_no" and parents["smooth-or-featured"] is None
    alpha = np.exp(np.random.default_rng(0).normal(size=(6, 5, len(schema.features) + 1)))
    got = bald_scores(alpha, columns, schema, parents)
    expected = []
    for i in range(5):  # loops, scipy entropy: an independent path
        from scipy.stats import entropy
        mean_frac, per_q = {}, {}
        for (question, _), cols in zip(schema.question_slices(), columns):
            p = alpha[:, i, cols] / alpha[:, i, cols].sum(axis=1, keepdims=True)
            per_q[question] = entropy(p.mean(axis=0)) - np.mean([entropy(row) for row in p])
            for j, c in enumerate(cols[:len(cols) - (question in others)]):
                mean_frac[schema.names[c]] = p[:, j].mean()
        total = 0.0
        for question in schema.question_names:
            weight, parent = 1.0, parents[question]
            while parent is not None:
                weight *= mean_frac[parent]
                parent = parents[schema.question_of(parent)]
            total += weight * per_q[question]
        expected.append(total)
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def _brute_greedy(points, k, first):
    chosen = [first]
    while len(chosen) < k:
        dist = [min(np.linalg.norm(p - points[c]) for c in chosen) if i not in chosen else -1
                for i, p in enumerate(points)]
        chosen.append(int(np.argmax(dist)))
    return chosen


@pytest.mark.parametrize("seed", range(6))
def test_k_center_greedy_equals_brute_force_and_is_a_2_approximation(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 11)), int(rng.integers(1, 4))
    points = rng.normal(size=(n, 3))
    got = k_center_greedy(points, k, seed=seed)
    assert list(got) == _brute_greedy(points, k, int(got[0]))
    assert len(set(got.tolist())) == k
    optimum = min(covering_radius(points, list(c)) for c in itertools.combinations(range(n), k))
    assert covering_radius(points, got) <= 2 * optimum + 1e-12
    # With labelled points, the first pick is the point farthest from them.
    already = rng.normal(size=(2, 3))
    far = int(np.argmax(np.linalg.norm(points[:, None] - already[None], axis=2).min(axis=1)))
    assert k_center_greedy(points, k, already=already)[0] == far


def _chunk(start, size):
    """A chunk of the synthetic pool's scores, made on demand: the pool never exists as a whole in the stream."""
    return np.random.default_rng(start).random(size).round(3)  # many ties: the cut must break them by id


def test_top_candidates_stream_matches_a_full_sort_in_a_small_memory_bound():
    num_pool, chunk, capacity = 200_000, 5_000, 500
    pool_bytes = num_pool * (8 + 8 + 4 * 4)  # score, id and a 4-float payload per galaxy: 6.4 MB
    top = TopCandidates(capacity, payload_dims=4)
    tracemalloc.start()
    for start in range(0, num_pool, chunk):
        ids = np.arange(start, start + chunk)
        top.add(_chunk(start, chunk), ids, np.repeat(ids[:, None], 4, axis=1))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < pool_bytes / 10  # bounded by capacity + one chunk (about 0.5 MB here), not by the pool
    scores = np.concatenate([_chunk(start, chunk) for start in range(0, num_pool, chunk)])
    got_scores, got_ids, payload = top.result()
    expected = np.lexsort((np.arange(num_pool), -scores))[:capacity]
    np.testing.assert_array_equal(got_ids, expected)
    np.testing.assert_array_equal(got_scores, scores[expected])
    np.testing.assert_array_equal(payload[:, 0], expected)  # payload rows follow their ids
    assert len(set(got_ids.tolist())) == capacity


def test_random_scores_and_quotas():
    keys = [f"decals_{i}" for i in range(50)]
    a = random_scores(keys, 3)
    np.testing.assert_array_equal(a[10:20], random_scores(keys[10:20], 3))  # independent of chunking
    assert not np.array_equal(a, random_scores(keys, 4))
    assert quota_counts(7, {"decals": 0.5, "sdss": 0.5}) == {"decals": 4, "sdss": 3}
    assert quota_counts(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert sum(quota_counts(101, {"a": 0.2, "b": 0.3, "c": 0.5}).values()) == 101
    with pytest.raises(ValueError, match="quota"):
        quota_counts(5, {"a": 0.0})
