"""Collapse monitors of self-supervised training, computed without gradients from the teacher pass of a logging step.

- teacher_entropy: mean entropy of the teacher's target distributions; -> ln K when the targets go uniform.
- prototype_entropy: entropy of the batch-mean target distribution; exp of it is the number of prototypes in use,
  -> 0 (one prototype) when the teacher assigns every image to the same prototype.
- cls_std: per-dimension std of the L2-normalised teacher CLS embeddings, averaged, times sqrt(d): about 1 for
  embeddings spread over the sphere, -> 0 when they collapse to a point.
- teacher_information: prototype_entropy - teacher_entropy, the mutual information between an image and its
  prototype (nats): 0 under either collapse, when every image gets the same distribution.
- rankme: exp(entropy of the normalised singular values) of the teacher CLS embeddings (Garrido et al. 2023), the
  effective rank, from their d x d Gram matrix.
Every statistic is a sum over the GLOBAL batch's rows (one all-reduce at a logging step), so it does not depend on
the world size. `collapse_kind` reads them; the stage warns once with the likely cause.
"""

from __future__ import annotations

import math

import torch

from models.ssl_losses import Reduce

# Thresholds: a healthy run of the ssl configs stays well inside them (README, Self-supervised), the negative
# controls (centering off, teacher temperature 1.0) cross them within a few steps.
DINOV2_TEACHER_TEMP = 0.07  # DINOv2's teacher temperature after its warm-up from 0.04
UNIFORM_ENTROPY_SHARE = 0.95  # teacher_entropy / ln K above this: uniform targets
DOMINANT_PROTOTYPE_SHARE = 0.25  # prototype_entropy / ln(min(K, rows)) below this: a few prototypes for everything
COLLAPSED_CLS_STD = 0.05


class MonitorSums:
    """One step's statistics over this rank's rows, kept on the device until `reduce`."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    @torch.no_grad()
    def add_teacher(self, probs: torch.Tensor, cls: torch.Tensor) -> None:
        """probs (C, K) target distributions, cls (C, D) teacher CLS embeddings of the same crops."""
        p = probs.double()
        self._add("entropy", -(p * torch.log(p.clamp(min=1e-30))).sum())
        self._add("probs", p.sum(dim=0))
        self._add("rows", p.new_tensor(float(p.shape[0])))
        z = cls.double()
        unit = torch.nn.functional.normalize(z, dim=1)
        self._add("unit", unit.sum(dim=0))
        self._add("unit_sq", (unit ** 2).sum(dim=0))
        self._add("gram", z.T @ z)

    def add_losses(self, losses: dict[str, torch.Tensor]) -> None:
        for name in ("dino", "ibot", "koleo"):
            self._add(f"{name}_loss", losses[name])

    def reduce(self, reduce_sum: Reduce) -> dict[str, float]:
        """Collective (one all-reduce of every sum): the global monitors; empty when nothing was added."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        flat = torch.cat([self.sums[n].reshape(-1) for n in names])
        flat = reduce_sum(flat)
        out, offset = {}, 0
        for name in names:
            size = self.sums[name].numel()
            out[name] = flat[offset:offset + size].reshape(self.sums[name].shape)
            offset += size
        self.sums = {}
        return summarise(out)


def rankme(gram: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank from Z^T Z: singular values of Z are the square roots of its eigenvalues."""
    singular = torch.linalg.eigvalsh(gram.double()).clamp(min=0).sqrt()
    p = singular / singular.sum().clamp(min=1e-30) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def summarise(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {f"{n}": float(sums[n]) for n in ("dino_loss", "ibot_loss", "koleo_loss") if n in sums}
    if "rows" not in sums:
        return out
    rows = float(sums["rows"])
    mean_p = sums["probs"] / rows
    mean_unit = sums["unit"] / rows
    variance = (sums["unit_sq"] / rows - mean_unit ** 2).clamp(min=0)
    out.update({
        "teacher_entropy": float(sums["entropy"]) / rows,
        "prototype_entropy": float(-(mean_p * torch.log(mean_p.clamp(min=1e-30))).sum()),
        "teacher_information": float(-(mean_p * torch.log(mean_p.clamp(min=1e-30))).sum()) - float(
            sums["entropy"]) / rows,
        "cls_std": float(variance.sqrt().mean()) * math.sqrt(mean_unit.numel()),
        "rankme": rankme(sums["gram"]),
        "num_rows": rows,
        "num_prototypes": mean_p.numel(),
    })
    return out


def collapse_kind(monitors: dict[str, float]) -> str | None:
    """'uniform', 'dominant', 'representation' or None for the monitors of one logging step."""
    if "teacher_entropy" not in monitors:
        return None
    ln_k = math.log(monitors["num_prototypes"])
    if monitors["teacher_entropy"] > UNIFORM_ENTROPY_SHARE * ln_k:
        return "uniform"
    reachable = math.log(max(2.0, min(monitors["num_prototypes"], monitors["num_rows"])))
    if monitors["prototype_entropy"] < DOMINANT_PROTOTYPE_SHARE * reachable:
        return "dominant"
    if monitors["cls_std"] < COLLAPSED_CLS_STD:
        return "representation"
    return None


def likely_cause(kind: str, monitors: dict[str, float], settings: dict) -> str:
    """A sentence naming the setting that most likely caused a collapse of this kind (settings: the ssl config
    values centering, teacher_temp, student_temp, global_batch_size, num_global_crops)."""
    k, crops = int(monitors["num_prototypes"]), settings["global_batch_size"] * settings["num_global_crops"]
    if kind == "uniform":
        head = (f"the teacher's targets are near uniform (entropy {monitors['teacher_entropy']:.3f} of ln K = "
                f"{math.log(k):.3f})")
        if settings["teacher_temp"] <= DINOV2_TEACHER_TEMP and settings["teacher_temp"] < settings["student_temp"]:
            # Seen with strong view augmentation (the CPU recipe's brightness/contrast jitter) while features improve.
            return (f"{head} at DINOv2's temperatures (teacher {settings['teacher_temp']:.3g}, student "
                    f"{settings['student_temp']:.3g}): the views may share little the model can match yet; if the kNN "
                    f"probe still rises, it is learning; if not, lower ssl.teacher_temp or weaken the augmentation")
        return (f"{head}: the teacher temperature ({settings['teacher_temp']}) is too high; it must be "
                f"well below the student's ({settings['student_temp']}); DINOv2 warms it from 0.04 to 0.07")
    if kind == "dominant":
        if settings["centering"] == "none":
            cause = "centering is off (ssl.centering=none): nothing stops one prototype from taking every image"
        else:
            cause = (f"the batch is too small for centering to hold: {crops} teacher crops per step for {k} "
                     f"prototypes; raise data.global_batch_size, lower ssl.dino_head.num_prototypes, or use "
                     f"ssl.centering=sinkhorn_knopp")
        return (f"{math.exp(monitors['prototype_entropy']):.1f} of {k} prototypes in use: {cause}")
    return (f"the teacher's CLS embeddings collapsed (std x sqrt(d) {monitors['cls_std']:.3f}, RankMe "
            f"{monitors['rankme']:.1f}): check the centering ({settings['centering']}), the teacher temperature "
            f"({settings['teacher_temp']}) and the batch ({crops} teacher crops per step)")
