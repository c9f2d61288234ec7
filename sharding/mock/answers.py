"""Volunteer answer probabilities for each Galaxy Zoo question, from the true morphology as perceived."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from sharding.mock.morphology import Morphology, winding
from sharding.mock.perception import Perception
from sharding.mock.tree import Question

Weights = dict[str, float]
FLOOR = 0.01  # every answer gets some votes: volunteers misclick and disagree


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _soft_category(value: float, centres: Weights, width: float) -> Weights:
    """Gaussian weights of `value` around each category's centre: neighbours get votes, far ones few."""
    return {name: math.exp(-0.5 * ((value - centre) / width) ** 2) for name, centre in centres.items()}


def _blend(seen: Weights, washed: Weights, visibility: float) -> Weights:
    """What a volunteer reports: the truth where detail survives, a washed-out default where it does not."""
    names = set(seen) | set(washed)
    s_total, w_total = sum(seen.values()) or 1.0, sum(washed.values()) or 1.0
    return {n: visibility * seen.get(n, 0.0) / s_total + (1 - visibility) * washed.get(n, 0.0) / w_total
            for n in names}


def _edge_on_look(p: Perception) -> float:
    """0..1: how strongly the image looks like a thin edge-on disk (survives poor resolution fairly well)."""
    return _sigmoid((0.32 - p.axis_ratio_seen) / 0.06)


def smooth_or_featured(m: Morphology, p: Perception, answers) -> Weights:
    if m.kind == "artifact":
        return {"artifact": 0.85, "smooth": 0.1, "featured-or-disk": 0.05}
    if m.kind == "smooth":
        flat = 0.3 * _edge_on_look(p)  # flattened ellipticals get some "disk" votes
        return {"smooth": 0.9 - flat, "featured-or-disk": 0.08 + flat, "artifact": 0.02}
    arms = min(1.0, 1.4 * m.arm_strength) if m.has_spiral else 0.0
    evidence = max(arms * p.visibility, m.bar_strength * p.visibility, 0.8 * float(m.clumpy) * p.visibility,
                   0.6 * (1 - m.bulge_to_total) * math.sqrt(p.visibility), _edge_on_look(p))
    featured = 0.1 + 0.85 * evidence
    return {"featured-or-disk": featured, "smooth": 0.98 - featured, "artifact": 0.02}


def disk_edge_on(m: Morphology, p: Perception, answers) -> Weights:
    yes = 0.04 + 0.92 * _edge_on_look(p)
    return {"yes": yes, "no": 1 - yes}


def has_spiral_arms(m: Morphology, p: Perception, answers) -> Weights:
    seen = min(1.0, 2.0 * m.arm_strength) * p.visibility ** 0.8 * (1 - _edge_on_look(p)) if m.has_spiral else 0.0
    yes = 0.08 + 0.87 * seen
    return {"yes": yes, "no": 1 - yes}


def bar(m: Morphology, p: Perception, answers) -> Weights:
    strength = m.bar_strength * p.visibility ** 1.2 * (1 - _edge_on_look(p))
    if "strong" in answers:
        width = 0.12 + 0.1 * (1 - p.visibility)
        return _soft_category(strength, {"no": 0.0, "weak": 0.35, "strong": 0.75}, width)
    yes = 0.06 + 0.9 * min(1.0, 1.3 * strength)
    return {"yes": yes, "no": 1 - yes}


BULGE_CENTRES_4 = {"none": 0.0, "just-noticeable": 0.1, "obvious": 0.28, "dominant": 0.55}
BULGE_CENTRES_5 = {"none": 0.0, "small": 0.07, "moderate": 0.18, "large": 0.35, "dominant": 0.6}


def bulge_size(m: Morphology, p: Perception, answers) -> Weights:
    # A PSF-smeared centre looks like a bigger bulge: poorly resolved disks are called bulge-dominated.
    seen = m.bulge_to_total + (1 - m.bulge_to_total) * 0.35 * (1 - p.resolved)
    centres = BULGE_CENTRES_5 if "moderate" in answers else BULGE_CENTRES_4
    return _soft_category(seen, centres, 0.06 + 0.08 * (1 - p.visibility))


def how_rounded(m: Morphology, p: Perception, answers) -> Weights:
    centres = {"round": 0.92, "in-between": 0.62, "cigar-shaped": 0.3}
    return _soft_category(p.axis_ratio_seen, centres, 0.1 + 0.05 * (1 - p.visibility))


def edge_on_bulge(m: Morphology, p: Perception, answers) -> Weights:
    shape = m.edge_on_bulge or ("none" if m.bulge_to_total == 0 else "rounded")
    seen = {name: (0.8 if name == shape else 0.1) for name in ("rounded", "boxy", "none")}
    return _blend(seen, {"rounded": 0.5, "boxy": 0.1, "none": 0.4}, math.sqrt(p.visibility))


def spiral_winding(m: Morphology, p: Perception, answers) -> Weights:
    washed = {"tight": 0.4, "medium": 0.4, "loose": 0.2}
    if not m.has_spiral:
        return washed
    seen = _soft_category(m.pitch_angle_deg, {"tight": 10.0, "medium": 20.0, "loose": 31.0}, 5.0)
    seen[winding(m.pitch_angle_deg)] += 0.5
    return _blend(seen, washed, p.visibility)


def spiral_arm_count(m: Morphology, p: Perception, answers) -> Weights:
    washed = {"cant-tell": 0.55, "2": 0.3, "1": 0.05, "3": 0.05, "4": 0.03, "more-than-4": 0.02}
    if not m.has_spiral:
        return washed
    centres = {"1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0, "more-than-4": 5.5}
    seen = _soft_category(float(m.arm_count), centres, 0.45)
    seen["cant-tell"] = 0.1
    return _blend(seen, washed, p.visibility ** 1.5)


def merging(m: Morphology, p: Perception, answers) -> Weights:
    centres = {"none": 0.0, "minor-disturbance": 1.0, "major-disturbance": 2.0, "merger": 3.0}
    level = {"none": 0.0, "minor": 1.0, "major": 2.0, "merger": 3.0}[m.disturbance]
    return _blend(_soft_category(level, centres, 0.5), {"none": 0.9, "minor-disturbance": 0.1},
                  math.sqrt(p.visibility))


def something_odd(m: Morphology, p: Perception, answers) -> Weights:
    odd = 0.07
    if m.disturbance != "none" or m.kind == "artifact":
        odd = 0.25 + 0.55 * math.sqrt(p.visibility)
    elif m.clumpy or m.dust_lane:
        odd = 0.15 + 0.35 * p.visibility
    return {"yes": odd, "no": 1 - odd}


def odd_feature(m: Morphology, p: Perception, answers) -> Weights:
    weights = {"ring": 0.1, "lens-or-arc": 0.03, "disturbed": 0.1, "irregular": 0.1, "other": 0.3,
               "merger": 0.05, "dust-lane": 0.05}
    boosts = {"merger": {"merger": 1.5, "disturbed": 0.6}, "major": {"disturbed": 1.2, "merger": 0.6},
              "minor": {"disturbed": 0.8, "irregular": 0.4}}.get(m.disturbance, {})
    for name, extra in boosts.items():
        weights[name] += extra
    if m.dust_lane:
        weights["dust-lane"] += 1.2
    if m.clumpy:
        weights["irregular"] += 0.8
    return weights


def clumpy_appearance(m: Morphology, p: Perception, answers) -> Weights:
    yes = 0.05 + 0.85 * p.visibility ** 1.5 if m.clumpy else 0.05 + 0.1 * float(m.has_spiral) * p.visibility
    return {"yes": yes, "no": 1 - yes}


def galaxy_symmetrical(m: Morphology, p: Perception, answers) -> Weights:
    yes = 0.5 + (0.3 if m.clump_symmetric else -0.25) * p.visibility
    return {"yes": yes, "no": 1 - yes}


def clumps_embedded(m: Morphology, p: Perception, answers) -> Weights:
    yes = 0.4 + 0.4 * p.visibility if m.is_disk else 0.3
    return {"yes": yes, "no": 1 - yes}


MODELS: dict[str, Callable[[Morphology, Perception, tuple[str, ...]], Weights]] = {
    "smooth-or-featured": smooth_or_featured, "disk-edge-on": disk_edge_on, "has-spiral-arms": has_spiral_arms,
    "bar": bar, "bulge-size": bulge_size, "how-rounded": how_rounded, "edge-on-bulge": edge_on_bulge,
    "spiral-winding": spiral_winding, "spiral-arm-count": spiral_arm_count, "merging": merging,
    "something-odd": something_odd, "odd-feature": odd_feature, "clumpy-appearance": clumpy_appearance,
    "galaxy-symmetrical": galaxy_symmetrical, "clumps-embedded-larger-object": clumps_embedded,
}


def answer_probabilities(question: Question, m: Morphology, p: Perception) -> np.ndarray:
    """Probabilities of the question's answers (in the campaign's order) for one volunteer."""
    model = MODELS.get(question.canonical)
    if model is None:
        raise ValueError(f"no volunteer model for question {question.name!r} (canonical {question.canonical!r}); "
                         f"known: {sorted(MODELS)}")
    weights = model(m, p, question.canonical_answers)
    probs = np.array([max(weights.get(a, 0.0), 0.0) for a in question.canonical_answers]) + FLOOR
    return probs / probs.sum()
