"""Active-learning selection as pure functions of prediction arrays: which galaxies volunteers should label next.

- `bald_scores`: per galaxy, the expected information gain (BALD) of asking volunteers, from MC-dropout samples of
  the Dirichlet concentrations. Each question's predictive distribution in one MC pass is the expected vote
  fractions alpha / sum(alpha) over its answers (the named ones, plus "other" for an incomplete question); the
  question's BALD is the entropy (nats) of the mean distribution minus the mean entropy of each pass's. We use the
  expected fractions rather than the Dirichlet-multinomial over N votes: it needs no vote count, has the closed
  form above, and is log(#answers) at most, so questions are comparable.
- `mc_variance_scores`: the same for models trained with MSE (no concentrations): the MC variance of the predicted
  fractions, summed over each question's answers.
- Both sum over questions weighted by the probability that a volunteer is asked the question: the product of the
  mean predicted fractions of the answers leading to it (`ask_probabilities`, the tree from `question_parents`).
- `k_center_greedy`: Gonzalez's farthest-point selection, a 2-approximation of the k-center covering radius.
- `TopCandidates`: the best `capacity` scores of a pool streamed in chunks (memory independent of the pool size).
"""

from __future__ import annotations

import numpy as np

from sharding.schema import FeatureSchema
from sharding.sky import unit_hash


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats over the last axis; 0 log 0 = 0."""
    p = np.clip(p, 0.0, 1.0)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def question_columns(schema: FeatureSchema, other_questions: tuple[str, ...] | list[str]) -> list[np.ndarray]:
    """Per question, its columns in the raw head output (F named answers, then one "other" per incomplete
    question, as models.head.OutputLayout orders them)."""
    out = []
    for question, sl in schema.question_slices():
        columns = list(range(sl.start, sl.stop))
        if question in other_questions:
            columns.append(len(schema.features) + list(other_questions).index(question))
        out.append(np.asarray(columns, np.int64))
    return out


def question_parents(schema: FeatureSchema, survey: str) -> dict[str, str | None]:
    """{question: the standard feature (e.g. disk-edge-on_no) whose answer leads to it, None for a root question},
    from the survey campaign's decision tree. A parent outside the schema is skipped up to the nearest ancestor
    in it (its answer counted as certain: an over-estimate of that question's chance to be asked)."""
    from sharding.mock.tree import load_tree
    from sharding.registry import load_survey

    tree = load_tree(load_survey(survey))
    by_column = {q.column(a): (q, canonical) for q in tree for a, canonical in zip(q.answers, q.canonical_answers)}
    names = set(schema.names)
    parents: dict[str, str | None] = {}
    for question in tree:
        parent, link = None, question.depends_on
        while link and link in by_column:
            owner, answer = by_column[link]
            if f"{owner.canonical}_{answer}" in names:
                parent = f"{owner.canonical}_{answer}"
                break
            link = owner.depends_on
        parents[question.canonical] = parent
    return {q: parents.get(q) for q in schema.question_names}


def ask_probabilities(fractions: np.ndarray, schema: FeatureSchema, parents: dict[str, str | None]) -> np.ndarray:
    """(n, Q) chance each question is asked: the product of the fractions of the answers leading to it."""
    names = schema.names
    out: dict[str, np.ndarray] = {}

    def asked(question: str, depth: int = 0) -> np.ndarray:
        if depth > len(parents):
            raise ValueError(f"question_parents has a cycle through {question!r}")
        if question not in out:
            parent = parents.get(question)
            out[question] = np.ones(len(fractions)) if parent is None else \
                asked(schema.question_of(parent), depth + 1) * fractions[:, names.index(parent)]
        return out[question]

    return np.stack([asked(q) for q in schema.question_names], axis=1) if names else np.zeros((len(fractions), 0))


def bald_per_question(alpha_samples: np.ndarray, columns: list[np.ndarray]) -> np.ndarray:
    """(n, Q) BALD in nats from (S, n, F + K) MC samples of Dirichlet concentrations (module docstring)."""
    alpha = np.asarray(alpha_samples, np.float64)
    out = np.empty((alpha.shape[1], len(columns)))
    for q, cols in enumerate(columns):
        p = alpha[..., cols] / alpha[..., cols].sum(axis=-1, keepdims=True)  # (S, n, A) expected fractions
        out[:, q] = _entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0)
    return np.maximum(out, 0.0)  # rounding can leave -1e-17 for a certain model


def bald_scores(alpha_samples: np.ndarray, columns: list[np.ndarray], schema: FeatureSchema,
                parents: dict[str, str | None]) -> np.ndarray:
    """(n,) expected information gain of labelling each galaxy: per-question BALD weighted by the chance of
    the question being asked, under the mean predicted fractions."""
    alpha = np.asarray(alpha_samples, np.float64)
    named = np.concatenate([alpha[..., cols] / alpha[..., cols].sum(axis=-1, keepdims=True) for cols in columns],
                           axis=-1).mean(axis=0)  # (n, F + K) in question order
    fractions = named[:, _named_positions(columns, len(schema.features))]
    return (bald_per_question(alpha, columns) * ask_probabilities(fractions, schema, parents)).sum(axis=1)


def _named_positions(columns: list[np.ndarray], num_features: int) -> np.ndarray:
    """Where each named feature (0..F-1) lands when the question columns are concatenated in order."""
    flat = np.concatenate(columns)
    return np.array([int(np.flatnonzero(flat == j)[0]) for j in range(num_features)])


def mc_variance_scores(fraction_samples: np.ndarray, schema: FeatureSchema,
                       parents: dict[str, str | None]) -> np.ndarray:
    """(n,) for MSE models: the MC variance of each question's fractions (summed over its answers), weighted by
    the chance of the question being asked."""
    frac = np.asarray(fraction_samples, np.float64)  # (S, n, F)
    variance = frac.var(axis=0)
    per_question = np.stack([variance[:, sl].sum(axis=1) for _, sl in schema.question_slices()], axis=1)
    return (per_question * ask_probabilities(frac.mean(axis=0), schema, parents)).sum(axis=1)


def k_center_greedy(points: np.ndarray, k: int, already: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Indices of k points chosen greedily farthest from everything chosen so far (Gonzalez, O(n k)).

    `already`: (m, D) points labelled before, which the first pick must already be far from; without them the
    first pick is a seeded random point. The covering radius is within a factor 2 of the optimal k-center's."""
    points = np.asarray(points, np.float64)
    n = len(points)
    if not 0 <= k <= n:
        raise ValueError(f"k-center greedy: cannot choose {k} of {n} points")
    min_dist = np.full(n, np.inf)
    for centre in (np.asarray(already, np.float64) if already is not None else np.zeros((0, points.shape[1]))):
        min_dist = np.minimum(min_dist, np.linalg.norm(points - centre, axis=1))
    chosen = np.empty(k, np.int64)
    for i in range(k):
        if i == 0 and np.isinf(min_dist).all():
            pick = int(np.random.default_rng(seed).integers(n))
        else:
            pick = int(np.argmax(min_dist))  # the first of equals: deterministic
        chosen[i] = pick
        min_dist = np.minimum(min_dist, np.linalg.norm(points - points[pick], axis=1))
        min_dist[pick] = -1.0  # never again, even among duplicates of a chosen point
    return chosen


def covering_radius(points: np.ndarray, centres: np.ndarray) -> float:
    """The largest distance from any point to its nearest centre."""
    points = np.asarray(points, np.float64)
    dist = np.linalg.norm(points[:, None, :] - points[np.asarray(centres)][None, :, :], axis=2)
    return float(dist.min(axis=1).max())


def random_scores(keys: list[str], seed: int) -> np.ndarray:
    """A stable uniform number per key and seed: random selection that does not depend on chunking or order."""
    return np.array([unit_hash(f"{seed}:{key}") for key in keys])


def quota_counts(budget: int, quotas: dict[str, float]) -> dict[str, int]:
    """The budget split by shares with largest remainder: the counts add up to the budget exactly."""
    if not quotas or any(share < 0 for share in quotas.values()) or sum(quotas.values()) <= 0:
        raise ValueError(f"--quota needs non-negative shares with a positive sum, got {quotas}")
    total = sum(quotas.values())
    exact = {s: budget * share / total for s, share in quotas.items()}
    counts = {s: int(np.floor(v)) for s, v in exact.items()}
    by_remainder = sorted(quotas, key=lambda s: (-(exact[s] - counts[s]), list(quotas).index(s)))
    for survey in by_remainder[:budget - sum(counts.values())]:
        counts[survey] += 1
    return counts


class TopCandidates:
    """The `capacity` highest scores of a stream of chunks (ties: the earlier id), with a payload row each.

    Memory holds at most capacity + one chunk, whatever the pool's size: each chunk is merged into the best so far
    and the rest dropped (argpartition does a heap's job on whole arrays)."""

    def __init__(self, capacity: int, payload_dims: int = 0):
        if capacity < 0:
            raise ValueError(f"candidates must be >= 0, got {capacity}")
        self.capacity = capacity
        self.scores = np.zeros(0)
        self.ids = np.zeros(0, np.int64)
        self.payload = np.zeros((0, payload_dims), np.float32)

    def add(self, scores: np.ndarray, ids: np.ndarray, payload: np.ndarray | None = None) -> None:
        scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)  # a NaN score is never a best one
        scores = np.concatenate([self.scores, scores])
        ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])
        rows = np.concatenate([self.payload, np.zeros((len(ids) - len(self.ids), self.payload.shape[1]), np.float32)
                               if payload is None else np.asarray(payload, np.float32)])
        keep = self._best(scores, ids)
        self.scores, self.ids, self.payload = scores[keep], ids[keep], rows[keep]

    def _best(self, scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if len(scores) <= self.capacity:
            return np.arange(len(scores))
        # Cut at the capacity-th best score, then break ties at the cut by id, so the result is order-independent.
        cut = np.partition(-scores, self.capacity - 1)[self.capacity - 1]
        above = np.flatnonzero(-scores < cut)
        tied = np.flatnonzero(-scores == cut)
        tied = tied[np.argsort(ids[tied], kind="stable")][:self.capacity - len(above)]
        return np.concatenate([above, tied])

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, ids, payload), best first (ties by id)."""
        order = np.lexsort((self.ids, -self.scores))
        return self.scores[order], self.ids[order], self.payload[order]
