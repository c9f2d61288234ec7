"""Masked vote-fraction MSE and the per-question Dirichlet-multinomial NLL on vote counts, by Batch field name."""

from __future__ import annotations

from typing import Literal

import torch

from models.head import OutputLayout, concentrations, fractions

Reduction = Literal["mean", "sum", "none"]


def _finite(labels: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(labels.float(), nan=0.0, posinf=0.0, neginf=0.0)


def _reduce(values: torch.Tensor, reduction: Reduction, count: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.sum() / count.clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; expected mean, sum or none")


def feature_has_votes(total_votes: torch.Tensor, layout: OutputLayout) -> torch.Tensor:
    """(N, F) bool: the feature's question got at least one vote (0 total also means "survey lacks it")."""
    return (_finite(total_votes) @ layout.feature_question.to(total_votes.device).T) > 0


def mse_labelled(feature_mask: torch.Tensor, total_votes: torch.Tensor, layout: OutputLayout) -> torch.Tensor:
    """(N, F) bool: the (galaxy, feature) pairs the masked MSE scores; their number is its "mean" divisor."""
    return feature_mask.bool() & feature_has_votes(total_votes, layout)


def masked_mse_loss(logits: torch.Tensor, *, features: torch.Tensor, feature_mask: torch.Tensor,
                    total_votes: torch.Tensor, layout: OutputLayout, reduction: Reduction = "mean") -> torch.Tensor:
    """Squared error of predicted vote fractions where a label exists.

    A feature counts where `feature_mask` is set and its question has votes (every registered survey carries
    vote counts; a fractions-only catalog would need its totals). "mean" divides by the number of such
    (galaxy, feature) pairs (0 when there are none); "none" gives (N, F) with zeros elsewhere.
    Takes public (N, F) or raw (N, F + K) logits.
    """
    mask = mse_labelled(feature_mask, total_votes, layout)
    predicted = fractions(logits.float(), layout)
    # Labels at absent features may hold anything, even NaN, and 0 * NaN gradients would poison the batch.
    target = torch.where(mask, _finite(features), torch.zeros_like(predicted))
    error = torch.where(mask, (predicted - target) ** 2, torch.zeros_like(predicted))
    return _reduce(error, reduction, mask.sum())


def question_labelled(feature_mask: torch.Tensor, total_votes: torch.Tensor, layout: OutputLayout) -> torch.Tensor:
    """(N, Q) bool: the galaxy's survey has at least one answer of the question and it got votes."""
    has_answer = feature_mask.float() @ layout.feature_question.to(feature_mask.device) > 0
    return has_answer & (_finite(total_votes) > 0)


def _category_term(counts: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(counts + alpha) - torch.lgamma(alpha) - torch.lgamma(counts + 1)


def dirichlet_multinomial_nll(raw_logits: torch.Tensor, *, votes: torch.Tensor, feature_mask: torch.Tensor,
                              total_votes: torch.Tensor, layout: OutputLayout) -> torch.Tensor:
    """(N, Q) negative log-likelihood of each question's vote counts; 0 where the question has no label.

    log p(k | N, alpha) = lgamma(N + 1) + lgamma(A) - lgamma(N + A)
                          + sum_j [lgamma(k_j + alpha_j) - lgamma(alpha_j) - lgamma(k_j + 1)],  A = sum_j alpha_j
    (Walmsley et al. 2022). The categories of a question are its present named answers plus one "rest" bucket
    holding its other answer (incomplete questions) and any named answers this galaxy's survey lacks: merging
    categories of a Dirichlet-multinomial sums their alphas and counts, so the likelihood stays exact. Rest
    votes are total_votes - sum(present named votes). A question without a rest bucket uses the named votes only.
    """
    alpha = concentrations(raw_logits.float(), layout)
    to_question = layout.feature_question.to(alpha.device)
    other_to_question = layout.other_question.to(alpha.device)
    present = feature_mask.bool()
    named_alpha, other_alpha = alpha[:, :layout.num_features], alpha[:, layout.num_features:]
    zeros = torch.zeros_like(named_alpha)
    counts = torch.where(present, _finite(votes), zeros)
    total_votes = _finite(total_votes)
    named_total = counts @ to_question

    total_alpha = named_alpha @ to_question + other_alpha @ other_to_question
    has_rest = ((~present).float() @ to_question > 0) | (other_to_question.sum(0) > 0)
    rest_counts = torch.where(has_rest, (total_votes - named_total).clamp(min=0), torch.zeros_like(named_total))
    rest_alpha = torch.where(present, zeros, named_alpha) @ to_question + other_alpha @ other_to_question
    # alpha 1 with 0 votes makes a missing bucket's term exactly 0 (and keeps lgamma away from alpha 0).
    rest_alpha = torch.where(has_rest, rest_alpha, torch.ones_like(rest_alpha))

    num_votes = named_total + rest_counts
    named_terms = torch.where(present, _category_term(counts, named_alpha), zeros)
    log_p = (torch.lgamma(num_votes + 1) + torch.lgamma(total_alpha) - torch.lgamma(num_votes + total_alpha)
             + named_terms @ to_question + _category_term(rest_counts, rest_alpha))
    # With no votes, or all of them in the rest bucket, log p is already 0; the mask makes that exact.
    labelled = question_labelled(feature_mask, total_votes, layout)
    return torch.where(labelled, -log_p, torch.zeros_like(log_p))


def dirichlet_multinomial_loss(raw_logits: torch.Tensor, *, votes: torch.Tensor, feature_mask: torch.Tensor,
                               total_votes: torch.Tensor, layout: OutputLayout,
                               reduction: Reduction = "mean") -> torch.Tensor:
    """Dirichlet-multinomial NLL summed over each galaxy's labelled questions.

    "mean" divides the sum by the number of galaxies with at least one labelled question (Zoobot's per-galaxy
    loss, sum over questions), so a galaxy from a survey with fewer questions weighs in with what it has;
    "none" gives (N, Q). Needs raw logits: `model(images, with_other=True)`.
    """
    if raw_logits.shape[-1] != layout.num_outputs:
        raise ValueError(f"the Dirichlet loss needs the {layout.num_outputs} raw logits (named + other), got "
                         f"{raw_logits.shape[-1]}: call the model with with_other=True")
    nll = dirichlet_multinomial_nll(raw_logits, votes=votes, feature_mask=feature_mask, total_votes=total_votes,
                                    layout=layout)
    return _reduce(nll, reduction, question_labelled(feature_mask, total_votes, layout).any(dim=1).sum())


LOSSES = {"mse": masked_mse_loss, "dirichlet": dirichlet_multinomial_loss}


def loss_count(kind: Literal["mse", "dirichlet"], batch, layout: OutputLayout) -> torch.Tensor:
    """The "mean" divisor of `batch_loss(kind, ...)` as an int64 scalar: labelled (galaxy, feature) pairs for the
    MSE, galaxies with a labelled question for the Dirichlet loss.

    A loss over a batch split across ranks or micro-batches is sum(part sums) / sum(part counts): each part's
    "mean" would weigh a galaxy by how many labels its part's other galaxies happen to have.
    """
    if kind == "mse":
        labelled = mse_labelled(batch.feature_mask, batch.total_votes, layout)
    elif kind == "dirichlet":
        labelled = question_labelled(batch.feature_mask, batch.total_votes, layout).any(dim=1)
    else:
        raise ValueError(f"unknown loss {kind!r}; expected one of {sorted(LOSSES)}")
    return labelled.sum().to(torch.int64)


def batch_loss(kind: Literal["mse", "dirichlet"], raw_logits: torch.Tensor, batch, layout: OutputLayout,
               reduction: Reduction = "mean") -> torch.Tensor:
    """The loss `kind` of raw logits against a loaders Batch, its label tensors passed by field name."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {sorted(LOSSES)}")
    labels = {"votes": batch.votes} if kind == "dirichlet" else {"features": batch.features}
    return LOSSES[kind](raw_logits, feature_mask=batch.feature_mask, total_votes=batch.total_votes, layout=layout,
                        reduction=reduction, **labels)
