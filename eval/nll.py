"""The Dirichlet-multinomial NLL of a prediction file: training's own loss function on the raw logits it holds.

`eval predict` writes each galaxy's raw head outputs (`<feature>__logit`, and `<question>__other_logit` for a
question whose named answers do not cover all of its answers). Scoring them with
models.losses.dirichlet_multinomial_nll, the function the model was trained with, clamp included, makes the
NLL eval reports the NLL training minimised, for any logits. It is reported only for models trained with the
Dirichlet loss: an MSE-trained model fits vote fractions alone, so its concentrations are arbitrary.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from models.head import OutputLayout
from models.losses import dirichlet_multinomial_nll
from sharding.schema import Feature, FeatureSchema, Question

LOGIT_SUFFIX = "__logit"
OTHER_LOGIT_SUFFIX = "__other_logit"


def logit_column(feature: str) -> str:
    return feature + LOGIT_SUFFIX


def other_logit_column(question: str) -> str:
    return question + OTHER_LOGIT_SUFFIX


def absent_reason(model: dict, columns) -> str | None:
    """Why a prediction file gets no NLL (None when it does): the loss its model was trained with, or its columns."""
    loss = model.get("loss")
    if loss is None:
        return ("no Dirichlet NLL: the model's export does not record the loss it was trained with, so its "
                "concentrations may be untrained; re-export it with the current `python -m train`")
    if loss != "dirichlet":
        return (f"no Dirichlet NLL: the model was trained with the {loss} loss, which fits vote fractions only; its "
                "Dirichlet concentrations are arbitrary, so an NLL would not measure the model")
    if not any(str(c).endswith(LOGIT_SUFFIX) for c in columns):
        return ("no Dirichlet NLL: the predictions hold no raw logits (<feature>__logit columns, written by the "
                "current `python -m eval predict`); predict again")
    return None


@lru_cache(maxsize=32)
def _layout(num_answers: int, has_other: bool) -> OutputLayout:
    """A one-question layout: the training loss of one question depends on that question's outputs only."""
    question = Question("q", [Feature(f"q_a{j}", f"a{j}") for j in range(num_answers)])
    return OutputLayout(FeatureSchema("one-question", 1, [question]), ("q",) if has_other else ())


def question_nll(logits: np.ndarray, other_logit: np.ndarray | None, votes: np.ndarray,
                 total_votes: np.ndarray) -> np.ndarray:
    """(n,) NLL of one question's votes, computed by the training loss; NaN where the galaxy has no label for it.

    `logits` (n, k) are the raw outputs of the question's named answers, `other_logit` (n,) its other answer's (None
    for a complete question), `votes` (n, k) the vote counts (NaN where the survey lacks the answer) and
    `total_votes` (n,) the question's total. As in training, a galaxy is labelled where some answer is present and
    the question got votes.
    """
    logits = np.asarray(logits, np.float32)
    votes = np.asarray(votes, np.float64)
    totals = np.nan_to_num(np.asarray(total_votes, np.float64), nan=0.0)
    raw = logits if other_logit is None else np.column_stack([logits, np.asarray(other_logit, np.float32)])
    present = np.isfinite(votes)
    nll = dirichlet_multinomial_nll(torch.from_numpy(np.ascontiguousarray(raw)),
                                    votes=torch.from_numpy(np.where(present, votes, 0.0).astype(np.float32)),
                                    feature_mask=torch.from_numpy(present),
                                    total_votes=torch.from_numpy(totals.astype(np.float32)[:, None]),
                                    layout=_layout(logits.shape[1], other_logit is not None))[:, 0]
    labelled = present.any(axis=1) & (totals > 0)
    return np.where(labelled, nll.double().numpy(), np.nan)
