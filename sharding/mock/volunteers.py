"""Volunteers walking a campaign's decision tree: vote counts per answer and fractions per question."""

from __future__ import annotations

import numpy as np

from sharding.mock.answers import answer_probabilities
from sharding.mock.morphology import Morphology
from sharding.mock.perception import Perception
from sharding.mock.tree import Question


def cast_votes(tree: list[Question], m: Morphology, p: Perception, rng: np.random.Generator,
               volunteers_mean: float) -> tuple[int, dict[str, int]]:
    """(classifications, votes per ortho answer column). A root question gets every classification; a
    dependent question gets exactly as many votes as its parent answer received."""
    num_classifications = int(rng.poisson(volunteers_mean))
    votes: dict[str, int] = {}
    for q in tree:
        asked = num_classifications if not q.depends_on else votes[q.depends_on]
        counts = rng.multinomial(asked, answer_probabilities(q, m, p))
        votes.update({q.column(a): int(c) for a, c in zip(q.answers, counts)})
    return num_classifications, votes


def question_total(q: Question, votes: dict[str, int]) -> int:
    return sum(votes[q.column(a)] for a in q.answers)


def fractions(q: Question, votes: dict[str, int]) -> dict[str, float]:
    """Vote fraction per answer column; NaN when nobody was asked (as in GZ DECaLS), never 0/0."""
    total = question_total(q, votes)
    return {q.column(a): (votes[q.column(a)] / total if total else float("nan")) for a in q.answers}
